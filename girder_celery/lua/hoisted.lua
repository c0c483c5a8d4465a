-- hoisted: the record's side of a hoist on a Redis Cluster, where the record is in another
-- slot than the offers (hoist.lua moved the entry of its offer up a tier, or looked at it, in
-- the tiers slot; on a single Redis hoist.lua does this itself). A queued record learns where
-- its copy goes and counts it; any other is not to be copied, and the caller drops its entry.
--
-- KEYS[1]  request record   <prefix>:req:{<key>}  hash
-- ARGV[1]  the queue its copy goes to, or "" (an entry looked at and left where it was)
--
-- Transition: queued, offered on a tier -> queued, offered on the tier ARGV[1] too
-- Returns {name, payload} while queued (nothing changed with ARGV[1] ""), else {} (not queued,
-- absent, or not a hash: corrupt).

local f = redis.pcall('HMGET', KEYS[1], 'state', 'name', 'payload')
if f.err or f[1] ~= 'queued' then
  return {}
end
if ARGV[1] ~= '' then
  redis.call('HSET', KEYS[1], 'offered_on', ARGV[1])
  redis.call('HINCRBY', KEYS[1], 'hoists', 1)
end
return {f[2] or '', f[3] or ''}
