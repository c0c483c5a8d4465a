-- edge: a running request records that it waits for its sub-requests, before it submits them,
-- on a Redis Cluster (invariants 5 and 1). On a single Redis submit.lua does this itself; on a
-- cluster the requester's keys are in another slot than its sub-requests', so this comes
-- first, in the requester's slot, and the caller then submits them and walks the edges from
-- those running (waitsfor.py says why writing the edge first makes that walk find every cycle).
-- Each also goes into the requester's graph, as requested ("r"), unless it is there already: the
-- caller corrects a new entry once the submit answers (to "c", answered from the store; or
-- drops it, a refused cycle or a corrupt record), so that one answered "r" costs nothing more.
-- A requester whose run was cancelled (cancelled.lua) is answered "cancelled" and requests nothing.
--
-- KEYS[1]     requester's record  <prefix>:req:{<requester>}    hash
-- KEYS[2]     requester's edges   <prefix>:waits:{<requester>}  set of keys
-- KEYS[3]     requester's graph   <prefix>:graph:{<requester>}  hash child key -> "r" or "c"
-- ARGV[1]     the owner token of the requester's run, or "" not to check it
-- ARGV[2]     TTL (ms) of the requester's edges (refreshed by each submit and renewal)
-- ARGV[3..]   the sub-requests' keys
--
-- Transition: the waits-for graph gains the edges requester -> each key; the requester's graph
-- gains each key not in it yet.
-- Returns "cancelled" (nothing changed), else {"ok", new}: new has a character per key, "1"
-- where the key is new in the requester's graph, "0" where it was there.

if ARGV[1] ~= '' and redis.pcall('HGET', KEYS[1], 'cancelled_owner') == ARGV[1] then
  return 'cancelled'
end
local new = {}
for i = 3, #ARGV do
  redis.call('SADD', KEYS[2], ARGV[i])
  new[#new + 1] = redis.call('HSETNX', KEYS[3], ARGV[i], 'r')
end
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return {'ok', table.concat(new)}
