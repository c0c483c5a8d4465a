-- submit: make a request known to the state store and register its waiter (invariants 1, 4).
-- Registering and reading the state happen in this one atomic step, so no result can be
-- written between them and missed (register, then check).
--
-- KEYS[1]  request record   <prefix>:req:<key>      hash
-- KEYS[2]  waiter set       <prefix>:waiters:<key>  set of mailbox names
-- ARGV[1]  payload: the canonical arguments (JSON)
-- ARGV[2]  task name
-- ARGV[3]  readable request, e.g. "proj.tasks.divide(1, 0)"
-- ARGV[4]  pool (queue) the offer goes to
-- ARGV[5]  waiter's mailbox name, or "" when nobody waits (apply_async)
-- ARGV[6]  re-offer after (ms): a request queued longer than this gets a fresh offer
--
-- Transitions:
--   absent | failed (not memoized) | running with an expired lease  ->  queued
--   queued, last offered more than ARGV[6] ms ago                    ->  queued (re-offered)
-- Returns {verdict, data}:
--   {"offer", ""}        now queued: the caller must publish an offer; waiter registered
--   {"queued", ""}       already queued and offered; waiter registered
--   {"running", owner}   a live executor holds it; waiter registered
--   {"done", value}      the memoized value (JSON); nothing registered
--   {"failed", error}    the memoized error (JSON); nothing registered

local rec = KEYS[1]
local f = redis.call('HMGET', rec, 'state', 'value', 'error', 'memo', 'lease_until', 'offered_at', 'owner')
local state = f[1]
if state == 'done' then
  return {'done', f[2]}
end
if state == 'failed' and f[4] == '1' then
  return {'failed', f[3]}
end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if ARGV[5] ~= '' then
  redis.call('SADD', KEYS[2], ARGV[5])
end

if state == 'running' and tonumber(f[5]) > now then
  return {'running', f[7]}
end
if state == 'queued' and now - tonumber(f[6]) < tonumber(ARGV[6]) then
  return {'queued', ''}
end

if state ~= 'queued' then
  -- absent, failed (not memoized) or running on an expired lease: (re)start from queued.
  redis.call('HDEL', rec, 'owner', 'node', 'lease_until', 'started_at', 'finished_at', 'error', 'memo')
  redis.call('PERSIST', rec)
  redis.call('HSET', rec, 'state', 'queued', 'payload', ARGV[1], 'name', ARGV[2],
    'request', ARGV[3], 'pool', ARGV[4])
  redis.call('HSETNX', rec, 'created_at', now)
end
redis.call('HSET', rec, 'offered_at', now)
redis.call('HINCRBY', rec, 'offers', 1)
return {'offer', ''}
