-- cancelled: fail one request in flight with a cancellation that is not memoized, for the walk
-- of a cancel (tree.py: who is cancelled, who is kept, and why the walk may read from the
-- client, a slot at a time). Every cancelled record remembers its owner ("cancelled_owner"):
-- that run's late complete or fail changes nothing, and its next submit of a sub-request is
-- answered "cancelled" (submit.lua). Refused if the record moved on since the walk read it: it
-- settled, another owner claimed it, or (ARGV[5] "1") a waiter the walk did not see joined it,
-- who still needs it.
--
-- KEYS[1]   request record   <prefix>:req:{<key>}      hash
-- KEYS[2]   waiter set       <prefix>:waiters:{<key>}  set of mailbox names
-- KEYS[3]   its edges        <prefix>:waits:{<key>}    set of keys it waits for (dropped)
-- KEYS[4]   its graph        <prefix>:graph:{<key>}    hash of its sub-requests (kept ARGV[4] ms)
-- ARGV[1]   the error (JSON): a girder_celery.GirderCancelled
-- ARGV[2]   TTL (ms) of the cancelled record (girder_error_ttl); 0 keeps it forever
-- ARGV[3]   the owner the walk read ("" for a queued one)
-- ARGV[4]   graph TTL (ms)
-- ARGV[5]   "1" to refuse if a waiter outside ARGV[6..] waits for it now, "" not to (the root)
-- ARGV[6..] the waiters the walk read
--
-- Transition: queued | running(ARGV[3])  ->  failed(cancelled, not memoized); its edges go.
-- Returns {1, the queue of its offer or "", its task name or "", its waiters' mailboxes...} for
-- the caller to drop the offer's index entry, count the failure and wake the waiters (after
-- this: write, then notify); {0} refused, nothing changed.

local rec = KEYS[1]
local f = redis.pcall('HMGET', rec, 'state', 'owner', 'offered_on', 'name')
if f.err or (f[1] ~= 'queued' and f[1] ~= 'running') then
  return {0}
end
local owner = f[1] == 'running' and f[2] or ''
if owner ~= ARGV[3] then
  return {0}
end
local waiters = redis.call('SMEMBERS', KEYS[2])
if ARGV[5] == '1' then
  local seen = {}
  for i = 6, #ARGV do
    seen[ARGV[i]] = true
  end
  for _, mailbox in ipairs(waiters) do
    if not seen[mailbox] then
      return {0}
    end
  end
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HDEL', rec, 'lease_until', 'offered_on')
redis.call('HSET', rec, 'state', 'failed', 'error', ARGV[1], 'memo', '0', 'finished_at', now, 'cancelled_at', now,
  'cancelled_owner', owner)
if tonumber(ARGV[2]) > 0 then
  redis.call('PEXPIRE', rec, ARGV[2])
else
  redis.call('PERSIST', rec)
end
redis.call('DEL', KEYS[3], KEYS[2])
if redis.call('PEXPIRE', KEYS[4], ARGV[4]) == 1 then
  redis.call('HSET', rec, 'subs', redis.call('HLEN', KEYS[4]))
end
local reply = {1, f[3] or '', f[4] or ''}
for i, mailbox in ipairs(waiters) do
  reply[3 + i] = mailbox
end
return reply
