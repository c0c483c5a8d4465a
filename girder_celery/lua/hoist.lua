-- hoist: copy offers that waited too long in one queue up to the next tier (the seed's
-- distributor). An offer still queued after ARGV[1] ms in its queue moves to the destination's
-- offers and the caller publishes a copy there; the original message stays where it is, and
-- whichever copy is claimed first runs (invariant 1). Entries no longer queued are dropped.
--
-- KEYS[1]  offers of the source queue        <prefix>:offers:<queue>   zset of keys by time (ms)
-- KEYS[2]  offers of the destination queue   <prefix>:offers:<parent>  zset (unused at the top)
-- ARGV[1]  hoist after (ms)
-- ARGV[2]  "<prefix>:req:", the records' key prefix
-- ARGV[3]  destination queue, or "" at the top of the tree (then only stale entries go)
-- ARGV[4]  most entries to look at
--
-- Transition: queued, offered on the source queue -> queued, offered on the destination too
-- Returns {key1, name1, payload1, key2, ...}: the offers to publish to the destination.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[1]), 'LIMIT', 0, tonumber(ARGV[4]))
local out = {}
for _, key in ipairs(due) do
  local rec = ARGV[2] .. key
  local f = redis.call('HMGET', rec, 'state', 'name', 'payload')
  if f[1] ~= 'queued' then
    redis.call('ZREM', KEYS[1], key)
  elseif ARGV[3] ~= '' then
    redis.call('ZREM', KEYS[1], key)
    redis.call('ZADD', KEYS[2], now, key)
    redis.call('HSET', rec, 'offered_on', ARGV[3])
    redis.call('HINCRBY', rec, 'hoists', 1)
    out[#out + 1] = key
    out[#out + 1] = f[2]
    out[#out + 1] = f[3]
  end
end
return out
