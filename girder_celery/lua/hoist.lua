-- hoist: copy offers that waited too long in one tier's queue up the pool tree (the seed's
-- distributor), for every tier of one node's chain in one call. An offer still queued after
-- ARGV[1] ms in its queue moves to the offers of the nearest tier above that is keeping up, and
-- the caller publishes a copy there; the original message stays where it is, and whichever copy
-- is claimed first runs (invariant 1). Entries no longer queued are dropped, and so are those
-- whose record is not a hash (corrupt: a claim of it would only skip it).
-- Backpressure: a tier with ARGV[4] offers of its own waiting longer than ARGV[1] ms is not
-- keeping up, so a copy would only wait there, to be skipped later by whoever reads it: it is
-- passed over for the tier above it, and when no tier above keeps up, nothing moves. Passing over
-- a busy pool, rather than queueing behind it, is what keeps each copy to one message beyond its
-- original when the work goes two tiers up. (A few stale offers in a tier are normal: a busy
-- node's prefetch holds some, and they must not stop the help that idle nodes can give.)
--
-- KEYS[1..n]    offers of the tiers, bottom up: a node's   <prefix>:offers:<queue>  zset of keys by
--               queue, its pool, the pool's ancestors                              time (ms)
-- ARGV[1]       hoist after (ms)
-- ARGV[2]       "<prefix>:req:", the records' key prefix
-- ARGV[3]       most entries to move out of one tier in one call
-- ARGV[4]       the backlog of stale offers that marks a tier as not keeping up
-- ARGV[5]       most entries to look at in a tier whose offers cannot move (the top, or nothing
--               above keeps up): only the oldest, which is where entries of lost records end up
-- ARGV[6..5+n]  the tiers' queue names, as KEYS
--
-- Transition: queued, offered on a tier -> queued, offered on a tier above it too (the nearest
-- that keeps up)
-- Returns {queue1, key1, name1, payload1, queue2, ...}: the offers to publish, and where.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local cutoff = now - tonumber(ARGV[1])
local batch, backlog, prune = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local out = {}

local function stale(j)
  return redis.call('ZCOUNT', KEYS[j], '-inf', cutoff)
end

local function nearest_keeping_up(i)
  for j = i + 1, #KEYS do
    if stale(j) < backlog then
      return j
    end
  end
  return nil
end

for i = 1, #KEYS do
  if stale(i) > 0 then
    local to = nearest_keeping_up(i)
    local due = redis.call('ZRANGEBYSCORE', KEYS[i], '-inf', cutoff, 'LIMIT', 0, to and batch or prune)
    for _, key in ipairs(due) do
      local rec = ARGV[2] .. key
      local f = redis.pcall('HMGET', rec, 'state', 'name', 'payload')
      if f.err or f[1] ~= 'queued' then
        redis.call('ZREM', KEYS[i], key)
      elseif to then
        redis.call('ZREM', KEYS[i], key)
        redis.call('ZADD', KEYS[to], now, key)
        redis.call('HSET', rec, 'offered_on', ARGV[5 + to])
        redis.call('HINCRBY', rec, 'hoists', 1)
        out[#out + 1] = ARGV[5 + to]
        out[#out + 1] = key
        out[#out + 1] = f[2]
        out[#out + 1] = f[3]
      end
    end
  end
end
return out
