-- submit: make a request known to the state store and register its waiter (invariants 1, 4, 5).
-- Registering and reading the state happen in this one atomic step, so no result can be
-- written between them and missed (register, then check). A request made inside a running
-- request (the requester) records the edge requester -> request in the waits-for graph and is
-- refused if that edge closes a cycle; the requester may also claim it here, to run it inline.
-- It also records the edge in the requester's graph, which outlives the run (girder.graph), and
-- counts a cache hit in the per-task stats. A requester whose run was cancelled (cancelled.lua) is
-- answered "cancelled" and requests nothing: that is where a cancelled run stops at the latest.
--
-- One slot or two parts. Given KEYS[1..8] (a single Redis: one slot), it does all of the above
-- here. Given KEYS[1..3] (a Redis Cluster: the request's slot alone), it makes the request's own
-- transition only, and the caller does the rest around it (store.py, waitsfor.py): the
-- requester's check and edge before (edge.lua), the offers' index, the graph and the counter
-- after, from what this answers.
--
-- KEYS[1]   request record        <prefix>:req:{<key>}        hash
-- KEYS[2]   waiter set            <prefix>:waiters:{<key>}    set of mailbox names
-- KEYS[3]   its graph             <prefix>:graph:{<key>}      dropped when it starts afresh
-- KEYS[4]   requester's edges     <prefix>:waits:{<requester>} set of keys (unused without one)
-- KEYS[5]   requester's graph     <prefix>:graph:{<requester>} hash child key -> "r" (requested)
--                                 or "c" (answered from the store); unused without one
-- KEYS[6]   requester's record    <prefix>:req:{<requester>}  hash (unused without one)
-- KEYS[7]   the pool's offers     <prefix>:offers:{..}:<pool> zset of keys by offer time (ms)
-- KEYS[8]   per-task stats        <prefix>:stats              hash: "hits:<task name>" += 1 per hit
-- ARGV[1]   payload: the canonical arguments (JSON)
-- ARGV[2]   task name
-- ARGV[3]   readable request, e.g. "proj.tasks.divide(1, 0)"
-- ARGV[4]   pool (queue) the offer goes to
-- ARGV[5]   waiter's mailbox name, or "" when nobody waits (apply_async)
-- ARGV[6]   re-offer after (ms): a request queued longer than this gets a fresh offer
-- ARGV[7]   the request's key
-- ARGV[8]   requester's key, or "" at top level
-- ARGV[9]   "<prefix>:waits:", to walk the waits-for graph (one slot only)
-- ARGV[10]  TTL (ms) of the requester's edges (refreshed by each submit)
-- ARGV[11]  claimer's owner token, or "" not to claim
-- ARGV[12]  claimer's node
-- ARGV[13]  lease (ms)
-- ARGV[14]  "<prefix>:offers:{..}:", to drop an older offer from the queue that holds it (one
--           slot only)
-- ARGV[15]  "1" to count a done answer as a cache hit, "" not to (a waiter's periodic re-check)
-- ARGV[16]  the owner token of the requester's run, or ""
--
-- Transitions:
--   absent | failed (not memoized) | running with an expired lease  ->  queued
--   queued, last offered more than ARGV[6] ms ago                    ->  queued (re-offered)
--   with a claimer, instead: any of those, or queued                 ->  running(claimer, lease),
--                                                                       placement "inline"
-- Every offer is recorded in the pool's offers (KEYS[7], or by the caller) and the record's
-- offered_on, so hoist.lua can copy it up a tier if it waits too long; a claim removes it.
-- Returns {verdict, data, offered at, older offer's queue}, the last two for the caller to
-- update the offers' index in two parts (else "" and ""):
--   {"offer", ""}         now queued: the caller must publish an offer; waiter registered
--   {"queued", ""}        already queued and offered; waiter registered
--   {"running", owner}    a live executor holds it; waiter registered
--   {"claimed", payload}  the claimer holds it now and runs it; no waiter registered
--   {"done", value}       the memoized value (JSON); nothing registered
--   {"failed", error}     the memoized error (JSON); nothing registered
--   {"cycle", keys}       it (transitively) waits for the requester: space-separated keys of
--                         the cycle, requester first and last; nothing changed (one slot only)
--   {"cancelled", ""}     the requester's run (ARGV[16]) was cancelled; nothing changed (one
--                         slot only)
--   {"corrupt", what}     the record is not one girder writes (not a hash, an unknown state,
--                         a lease_until or offered_at that is not a number): what is wrong;
--                         nothing changed (forget.lua clears it)

local rec = KEYS[1]
local f = redis.pcall('HMGET', rec, 'state', 'value', 'error', 'memo', 'lease_until', 'offered_at', 'owner', 'payload',
  'offered_on')
if f.err then
  return {'corrupt', 'its key holds a ' .. redis.call('TYPE', rec).ok .. ', not a hash'}
end
local one = #KEYS == 8
local requester = ARGV[8]
if one and requester ~= '' and ARGV[16] ~= '' and redis.call('HGET', KEYS[6], 'cancelled_owner') == ARGV[16] then
  return {'cancelled', ''}
end

-- The edge requester -> request in the requester's graph: the first submit of it says how it was
-- answered, "c" from the store, "r" otherwise (later re-checks change nothing).
local function record_edge(how)
  if one and requester ~= '' then
    redis.call('HSETNX', KEYS[5], ARGV[7], how)
  end
end

local state = f[1]
if state == 'done' or (state == 'failed' and f[4] == '1') then
  record_edge('c')
  if one and ARGV[15] == '1' then
    redis.call('HINCRBY', KEYS[8], 'hits:' .. ARGV[2], 1)
  end
  return {state, state == 'done' and f[2] or f[3]}
end
-- A record girder never writes is answered "corrupt" before anything changes (the hot path,
-- a done record, has returned already).
local lease_until, offered_at = tonumber(f[5]), tonumber(f[6])
if state == 'running' and not lease_until then
  return {'corrupt', 'it is running, and its lease_until is not a number: ' .. string.sub(f[5] or 'none', 1, 64)}
end
if state == 'queued' and not offered_at then
  return {'corrupt', 'it is queued, and its offered_at is not a number: ' .. string.sub(f[6] or 'none', 1, 64)}
end
if state and state ~= 'queued' and state ~= 'running' and state ~= 'failed' then
  return {'corrupt', 'its state is unknown: ' .. string.sub(state, 1, 64)}
end

if one and requester ~= '' then
  -- Breadth-first walk from the request along waits-for edges, looking for the requester.
  local came_from = {[ARGV[7]] = false}
  local queue, head, found = {ARGV[7]}, 1, ARGV[7] == requester
  while not found and head <= #queue and head <= 10000 do
    local node = queue[head]
    head = head + 1
    for _, next_key in ipairs(redis.call('SMEMBERS', ARGV[9] .. '{' .. node .. '}')) do
      if came_from[next_key] == nil then
        came_from[next_key] = node
        queue[#queue + 1] = next_key
        if next_key == requester then
          found = true
          break
        end
      end
    end
  end
  if found then
    local path, node = {}, requester
    while node do
      table.insert(path, 1, node)
      node = came_from[node]
    end
    table.insert(path, 1, requester)
    return {'cycle', table.concat(path, ' ')}
  end
  redis.call('SADD', KEYS[4], ARGV[7])
  redis.call('PEXPIRE', KEYS[4], ARGV[10])
  record_edge('r')
end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local live = state == 'running' and lease_until > now
local claimer = ARGV[11]
if ARGV[5] ~= '' and (claimer == '' or live) then
  redis.call('SADD', KEYS[2], ARGV[5])
end
if live then
  return {'running', f[7]}
end
if claimer == '' and state == 'queued' and now - offered_at < tonumber(ARGV[6]) then
  return {'queued', ''}
end

local older = ''
if f[9] then
  if one then
    redis.call('ZREM', ARGV[14] .. f[9], ARGV[7])
  else
    older = f[9]
  end
  redis.call('HDEL', rec, 'offered_on')
end
if state ~= 'queued' then
  -- absent, failed (not memoized) or running on an expired lease: (re)start from queued.
  redis.call('HDEL', rec, 'owner', 'node', 'lease_until', 'started_at', 'finished_at', 'error', 'memo', 'placement',
    'claimed_via', 'subs', 'cancelled_at', 'cancelled_owner')
  redis.call('DEL', KEYS[3])
  redis.call('PERSIST', rec)
  redis.call('HSET', rec, 'state', 'queued', 'payload', ARGV[1], 'name', ARGV[2],
    'request', ARGV[3], 'pool', ARGV[4], 'parent', requester)
  redis.call('HSETNX', rec, 'created_at', now)
end
if claimer ~= '' then
  redis.call('HSET', rec, 'state', 'running', 'owner', claimer, 'node', ARGV[12],
    'lease_until', now + tonumber(ARGV[13]), 'started_at', now, 'placement', 'inline', 'parent', requester)
  redis.call('HINCRBY', rec, 'attempts', 1)
  if one then
    return {'claimed', f[8] or ARGV[1]}
  end
  return {'claimed', f[8] or ARGV[1], '', older}
end
redis.call('HSET', rec, 'offered_at', now, 'offered_on', ARGV[4])
redis.call('HINCRBY', rec, 'offers', 1)
if one then
  redis.call('ZADD', KEYS[7], now, ARGV[7])
  return {'offer', ''}
end
return {'offer', '', now, older}
