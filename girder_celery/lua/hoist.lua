-- hoist: copy offers that waited too long in one tier's queue up the pool tree (the seed's
-- distributor), for every tier of one node's chain in one call. An offer still queued after
-- ARGV[1] ms in its queue moves to the offers of the nearest tier above that can take it, and
-- the caller publishes a copy there; the original message stays where it is, and whichever copy
-- is claimed first runs (invariant 1). Entries no longer queued are dropped, and so are those
-- whose record is not a hash (corrupt: a claim of it would only skip it).
--
-- Which tier can take a copy:
-- * Backpressure: a tier with ARGV[4] offers of its own waiting longer than ARGV[1] ms is not
--   keeping up, so a copy would only wait there, to be skipped later by whoever reads it: it is
--   passed over for the tier above it, and when no tier above keeps up, nothing moves. (A few
--   stale offers in a tier are normal: a busy node's prefetch holds some, and they must not stop
--   the help that idle nodes can give.)
-- * A window: a pool below the top holds at most as many offers as it has shown it takes. Each
--   copy that waited there long enough to be hoisted on is one its nodes did not take, and costs
--   a skipped message later; so a pool's window halves after a period (ARGV[1] ms) in which
--   offers were hoisted out of it, and grows by half after one in which it took a window's worth
--   and hoisted none on. Copies beyond a pool's window go to the tier above (every node consumes
--   its pool's ancestors too, so nothing is out of reach). The top pool has no window: what
--   reaches it stays there until taken.
--
-- One slot or two parts. Every tier's offers and window are in the tiers slot. On a single
-- Redis (ARGV[2] given) the records are read here too. On a Redis Cluster (ARGV[2] ""), they
-- are in other slots: each due entry is moved as if its record were queued, and the caller
-- then checks each record (hoisted.lua), dropping the entries whose records are not queued
-- (store.py says why the index may run ahead of the records this way).
--
-- KEYS[1..n]     offers of the tiers, bottom up: a node's   <prefix>:offers:{..}:<queue>  zset of
--                queue, its pool, the pool's ancestors                                   keys by
--                                                                                        time (ms)
-- KEYS[n+1..2n]  the tiers' windows, as KEYS[1..n]          <prefix>:window:{..}:<queue>  hash: w,
--                                                                               in, over, at (ms)
-- ARGV[1]        hoist after (ms)
-- ARGV[2]        "<prefix>:req:", the records' key prefix; "" on a Redis Cluster
-- ARGV[3]        most entries to move out of one tier in one call, and the largest window
-- ARGV[4]        the backlog of stale offers that marks a tier as not keeping up, and a new
--                pool's window
-- ARGV[5]        most entries to look at in a tier whose offers cannot move (the top, or nothing
--                above can take them): only the oldest, which is where entries of lost records
--                end up
-- ARGV[6]        how long a window is kept once no pass adjusts it (ms)
-- ARGV[7..6+n]   the tiers' queue names, as KEYS[1..n]
--
-- Transition: queued, offered on a tier -> queued, offered on a tier above it too (the nearest
-- that can take it)
-- Returns {due_in, queue1, key1, name1, payload1, queue2, ...}: due_in, the ms until the oldest
-- offer left in a tier below the top is due (ARGV[1] when there is none: an offer made now is due
-- then; 0 or less when one is due and could not move), for the caller to time its next pass;
-- then the offers to publish, and where. With ARGV[2] "", {due_in, queue1 or "", key1, from1, "",
-- ...}: each entry moved to queue1 out of tier from1, or, with "", looked at and left in from1,
-- for the caller to check against its record.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local after = tonumber(ARGV[1])
local cutoff = now - after
local batch, backlog, prune = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local n = #KEYS / 2
local out = {after}
local one = ARGV[2] ~= ''

local function stale(j)
  return redis.call('ZCOUNT', KEYS[j], '-inf', cutoff)
end

-- How many more offers tier j takes in this pass: none if it is not keeping up; below the top,
-- what its window leaves, the window first adjusted if a period has passed since it last was.
local function room(j)
  if stale(j) >= backlog then
    return 0
  end
  if j == n then
    return batch
  end
  local win = KEYS[n + j]
  local h = redis.call('HMGET', win, 'w', 'in', 'over', 'at')
  local w = tonumber(h[1]) or backlog
  if now - (tonumber(h[4]) or 0) >= after then
    if (tonumber(h[3]) or 0) > 0 then
      w = math.max(1, math.floor(w / 2))
    elseif (tonumber(h[2]) or 0) >= w then
      w = math.min(batch, w + math.ceil(w / 2))
    end
    redis.call('HSET', win, 'w', w, 'in', 0, 'over', 0, 'at', now)
    redis.call('PEXPIRE', win, ARGV[6])
  end
  return math.max(0, w - redis.call('ZCARD', KEYS[j]))
end

for i = 1, n do
  if stale(i) > 0 then
    local rooms, to = {}, nil
    for j = i + 1, n do
      rooms[j] = room(j)
      to = to or (rooms[j] > 0 and j or nil)
    end
    local due = redis.call('ZRANGEBYSCORE', KEYS[i], '-inf', cutoff, 'LIMIT', 0, to and batch or prune)
    for _, key in ipairs(due) do
      local rec, f = ARGV[2] .. '{' .. key .. '}', {'queued', ARGV[6 + i], ''}
      if one then
        f = redis.pcall('HMGET', rec, 'state', 'name', 'payload')
      end
      if f.err or f[1] ~= 'queued' then
        redis.call('ZREM', KEYS[i], key)
      elseif not to and not one then
        local m = #out
        out[m + 1], out[m + 2], out[m + 3], out[m + 4] = '', key, ARGV[6 + i], ''
      elseif to then
        redis.call('ZREM', KEYS[i], key)
        redis.call('ZADD', KEYS[to], now, key)
        if one then
          redis.call('HSET', rec, 'offered_on', ARGV[6 + to])
          redis.call('HINCRBY', rec, 'hoists', 1)
        end
        if to < n then
          redis.call('HINCRBY', KEYS[n + to], 'in', 1)
        end
        if i > 1 then
          redis.call('HINCRBY', KEYS[n + i], 'over', 1)
          redis.call('PEXPIRE', KEYS[n + i], ARGV[6])
        end
        out[#out + 1] = ARGV[6 + to]
        out[#out + 1] = key
        out[#out + 1] = f[2]
        out[#out + 1] = f[3]
        rooms[to] = rooms[to] - 1
        while to and rooms[to] <= 0 do
          to = to < n and to + 1 or nil
        end
      end
    end
  end
end

for i = 1, n - 1 do
  local oldest = redis.call('ZRANGE', KEYS[i], 0, 0, 'WITHSCORES')
  if oldest[2] then
    out[1] = math.min(out[1], tonumber(oldest[2]) - cutoff)
  end
end
return out
