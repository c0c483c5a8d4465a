-- forget: drop a settled request's memoized value or error.
-- A request in flight is left alone: its waiters are still owed an answer.
--
-- KEYS[1]  request record   <prefix>:req:<key>  hash
--
-- Transition: done | failed  ->  absent
-- Returns the state before the call ("done", "failed", "queued", "running"), or "absent".

local state = redis.call('HGET', KEYS[1], 'state')
if not state then
  return 'absent'
end
if state == 'done' or state == 'failed' then
  redis.call('DEL', KEYS[1])
end
return state
