-- cancel: fail a request in flight and every sub-request of it that no other live request
-- waits for, with a cancellation that is not memoized, and wake all their waiters (invariants 1, 4).
-- Who waits for what: a running request's waits-for edges (<prefix>:waits:{<key>}) name the
-- sub-requests it waits for; a sub-request's waiter set names the mailboxes waiting for it, and
-- an inline waiter's mailbox is "<prefix>:mailbox:<its request's key>/<id>" (a caller outside
-- any request has no key in its mailbox's name); a sub-request run inline is waited for by the
-- request whose waiter claimed it, named after the ">" of its owner token. A sub-request is
-- kept when a mailbox of a caller outside any request, or of a live request (running, its lease
-- unexpired) not cancelled here, waits for it, or when such a request runs it inline; the walk
-- goes on until nothing more can be cancelled (a diamond inside the tree is cancelled too).
-- Every cancelled record remembers its owner ("cancelled_owner"): that run's late complete or
-- fail changes nothing, and its next submit of a sub-request is answered "cancelled" (submit.lua).
--
-- A single Redis only: on a Redis Cluster the walk reaches other slots, and cancel.py walks
-- from the client instead, cancelling each request with cancelled.lua.
--
-- KEYS[1]  the request's record  <prefix>:req:{<key>}  hash (the others are reached by the walk)
-- ARGV[1]  the request's key
-- ARGV[2]  "<prefix>:", to reach records, edges, waiter sets, graphs and stats
-- ARGV[3]  TTL (ms) of a cancelled record (girder_error_ttl); 0 keeps it forever
-- ARGV[4]  mailbox TTL (ms)
-- ARGV[5]  graph TTL (ms)
-- ARGV[6]  the message of the request's cancellation
-- ARGV[7]  the message of its sub-requests' cancellations
-- ARGV[8]  most requests to cancel in one call
-- ARGV[9]  "<prefix>:offers:{..}:", to reach the offers of a queue
--
-- Transition: queued | running  ->  failed(cancelled, not memoized), for the request and the
-- sub-requests nobody else waits for; their offers are withdrawn, their edges dropped. Each
-- waiter's mailbox receives "failed:<key>:<error>"; the mailbox of a cancelled request's waiter
-- that waits for a sub-request kept for others receives "failed:<that request>:<its error>",
-- to wake it, and leaves that sub-request's waiter set.
-- Returns {verdict, cancelled keys (the request first), {key1, node1, key2, ...}}: the verdict
-- "cancelled", or else the record's state ("done", "failed", "absent") or "corrupt", with
-- nothing changed; the pairs name the cancelled requests a node runs from their own messages
-- (not inline), to be terminated there, except those on whose stack a kept sub-request runs.

local root, p = ARGV[1], ARGV[2]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local function name(kind, k)
  return p .. kind .. ':{' .. k .. '}'
end
local function fields(k)
  return redis.pcall('HMGET', name('req', k), 'state', 'owner', 'lease_until', 'offered_on', 'name', 'request',
    'node')
end
local function in_flight(f)
  return not f.err and (f[1] == 'queued' or f[1] == 'running')
end

local f = fields(root)
if f.err then
  return {'corrupt', {}, {}}
end
if not in_flight(f) then
  return {f[1] or 'absent', {}, {}}
end

local cancelled, order = {[root] = f}, {root}
local function live(r)
  local g = redis.pcall('HMGET', name('req', r), 'state', 'lease_until')
  return not g.err and g[1] == 'running' and (tonumber(g[2]) or 0) > now
end
local function waits_outside(r)
  return not cancelled[r] and live(r)
end
local function held(c, g)
  for _, mailbox in ipairs(redis.call('SMEMBERS', name('waiters', c))) do
    local r = string.match(mailbox, ':mailbox:(%x+)/')
    if r == nil or waits_outside(r) then
      return true
    end
  end
  local r = g[1] == 'running' and string.match(g[2] or '', '>(%x*)$')
  return r and (r == '' or waits_outside(r)) or false
end

-- The walk: the sub-requests of what is cancelled, until a round cancels nothing more.
local limit, candidates, frontier = tonumber(ARGV[8]), {}, {root}
repeat
  for _, k in ipairs(frontier) do
    for _, c in ipairs(redis.call('SMEMBERS', name('waits', k))) do
      if not cancelled[c] and candidates[c] == nil then
        local g = fields(c)
        if in_flight(g) then
          candidates[c] = g
        end
      end
    end
  end
  frontier = {}
  for c, g in pairs(candidates) do
    if #order < limit and not held(c, g) then
      cancelled[c], candidates[c] = g, nil
      order[#order + 1], frontier[#frontier + 1] = c, c
    end
  end
until #frontier == 0

local errors, terminate = {}, {}
for i, k in ipairs(order) do
  local g, rec = cancelled[k], name('req', k)
  local err = cjson.encode({message = (i == 1) and ARGV[6] or ARGV[7], key = k, request = g[6] or k,
    exc_type = 'girder_celery.GirderCancelled', causes = {}})
  errors[k] = err
  if g[4] then
    redis.call('ZREM', ARGV[9] .. g[4], k)
  end
  local owner = g[1] == 'running' and g[2] or ''
  redis.call('HDEL', rec, 'lease_until', 'offered_on')
  redis.call('HSET', rec, 'state', 'failed', 'error', err, 'memo', '0', 'finished_at', now, 'cancelled_at', now,
    'cancelled_owner', owner)
  if tonumber(ARGV[3]) > 0 then
    redis.call('PEXPIRE', rec, ARGV[3])
  else
    redis.call('PERSIST', rec)
  end
  redis.call('DEL', name('waits', k))
  local graph = name('graph', k)
  if redis.call('PEXPIRE', graph, ARGV[5]) == 1 then
    redis.call('HSET', rec, 'subs', redis.call('HLEN', graph))
  end
  if g[5] then
    redis.call('HINCRBY', p .. 'stats', 'failures:' .. g[5], 1)
  end
  local waiters = name('waiters', k)
  for _, mailbox in ipairs(redis.call('SMEMBERS', waiters)) do
    redis.call('RPUSH', mailbox, 'failed:' .. k .. ':' .. err)
    redis.call('PEXPIRE', mailbox, ARGV[4])
  end
  redis.call('DEL', waiters)
  if owner ~= '' and (tonumber(g[3]) or 0) > now and not string.find(owner, '>', 1, true) then
    terminate[k] = g[7] or ''
  end
end

-- Sub-requests kept for others: a cancelled waiter of one hears of its own cancellation, and
-- a stack running one inline is not terminated (the kept run goes on there, for its waiters).
local told = {}
for c, g in pairs(candidates) do
  local waiters = name('waiters', c)
  for _, mailbox in ipairs(redis.call('SMEMBERS', waiters)) do
    local r = string.match(mailbox, ':mailbox:(%x+)/')
    if r and cancelled[r] then
      if not told[mailbox] then
        told[mailbox] = true
        redis.call('RPUSH', mailbox, 'failed:' .. r .. ':' .. errors[r])
        redis.call('PEXPIRE', mailbox, ARGV[4])
      end
      redis.call('SREM', waiters, mailbox)
    end
  end
  local r = g[1] == 'running' and string.match(g[2] or '', '>(%x+)$')
  for _ = 1, 10000 do
    if not (r and cancelled[r]) then
      break
    end
    terminate[r] = nil
    r = string.match(cancelled[r][2] or '', '>(%x+)$')
  end
end

local pairs_out = {}
for _, k in ipairs(order) do
  if terminate[k] then
    pairs_out[#pairs_out + 1] = k
    pairs_out[#pairs_out + 1] = terminate[k]
  end
end
return {'cancelled', order, pairs_out}
