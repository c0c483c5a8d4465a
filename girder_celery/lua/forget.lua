-- forget: drop a settled request's memoized value or error, or a corrupt record.
-- A request in flight is left alone: its waiters are still owed an answer. A record girder
-- never writes (not a hash, an unknown state, a running one whose lease_until or a queued one
-- whose offered_at is not a number) is dropped too: no script can move it on, and the next
-- submit of the key (a waiter's next check among them) offers it afresh.
--
-- KEYS[1]  request record   <prefix>:req:{<key>}  hash
-- KEYS[2]  its graph        <prefix>:graph:{<key>}  hash of the sub-requests it made (dropped too)
--
-- Transition: done | failed | corrupt  ->  absent
-- Returns the state before the call ("done", "failed", "queued", "running"), "corrupt", or
-- "absent".

local f = redis.pcall('HMGET', KEYS[1], 'state', 'lease_until', 'offered_at')
local state = f[1]
if f.err then
  state = 'corrupt'
elseif not state then
  return 'absent'
elseif state == 'running' then
  if tonumber(f[2]) then
    return state
  end
  state = 'corrupt'
elseif state == 'queued' then
  if tonumber(f[3]) then
    return state
  end
  state = 'corrupt'
elseif state ~= 'done' and state ~= 'failed' then
  state = 'corrupt'
end
redis.call('DEL', KEYS[1], KEYS[2])
return state
