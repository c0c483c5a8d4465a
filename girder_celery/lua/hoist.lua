-- hoist: copy offers that waited too long in one queue up to the next tier (the seed's
-- distributor). An offer still queued after ARGV[1] ms in its queue moves to the destination's
-- offers and the caller publishes a copy there; the original message stays where it is, and
-- whichever copy is claimed first runs (invariant 1). Entries no longer queued are dropped,
-- and so are those whose record is not a hash (corrupt: a claim of it would only skip it).
-- Backpressure: nothing moves while the destination has ARGV[4] offers of its own waiting longer
-- than ARGV[1] ms: that tier is not keeping up either, and a copy would only wait there, to be
-- skipped later by whoever reads it. (A few stale offers there are normal: a busy node's
-- prefetch holds some, and they must not stop the help that idle nodes can give.)
--
-- KEYS[1]  offers of the source queue        <prefix>:offers:<queue>   zset of keys by time (ms)
-- KEYS[2]  offers of the destination queue   <prefix>:offers:<parent>  zset (unused at the top)
-- ARGV[1]  hoist after (ms)
-- ARGV[2]  "<prefix>:req:", the records' key prefix
-- ARGV[3]  destination queue, or "" at the top of the tree (then only stale entries go)
-- ARGV[4]  most entries to move at once (and the destination's backlog that stops moving)
--
-- Transition: queued, offered on the source queue -> queued, offered on the destination too
-- (unless the destination is not keeping up)
-- Returns {key1, name1, payload1, key2, ...}: the offers to publish to the destination.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local cutoff = now - tonumber(ARGV[1])
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', cutoff, 'LIMIT', 0, tonumber(ARGV[4]))
local busy = ARGV[3] ~= '' and redis.call('ZCOUNT', KEYS[2], '-inf', cutoff) >= tonumber(ARGV[4])
local out = {}
for _, key in ipairs(due) do
  local rec = ARGV[2] .. key
  local f = redis.pcall('HMGET', rec, 'state', 'name', 'payload')
  if f.err or f[1] ~= 'queued' then
    redis.call('ZREM', KEYS[1], key)
  elseif ARGV[3] ~= '' and not busy then
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
