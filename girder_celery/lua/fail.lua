-- fail: store a request's error, then wake its waiters (invariants 1, 4).
-- Every waiter in flight hears of the failure. Unless memoized (the task's cache_errors), the
-- failed record only informs girder.state(): the next submit starts the request again. The
-- failure is counted in the per-task stats (with the run, when one ran), and the request's graph
-- (the sub-requests it made) is kept ARGV[9] ms from now; the record's "subs" says how many it
-- made (so a graph that expires is told from none).
--
-- One slot or two parts. Given KEYS[1..5] (a single Redis: one slot) it notifies the waiters
-- and counts here; given KEYS[1..4] (a Redis Cluster: the request's slot alone) it answers
-- the mailboxes and the counts, and the caller pushes and counts once it has stored the
-- outcome (store.py: the value is written before any waiter is told, invariant 4).
--
-- KEYS[1]  request record   <prefix>:req:{<key>}      hash
-- KEYS[2]  waiter set       <prefix>:waiters:{<key>}  set of mailbox names
-- KEYS[3]  its edges        <prefix>:waits:{<key>}    set of keys it waited for
-- KEYS[4]  its graph        <prefix>:graph:{<key>}    hash of the sub-requests it made
-- KEYS[5]  per-task stats   <prefix>:stats          hash: "failures:<name>" += 1, and for a run
--                                                   "runs:<name>" += 1, "ms:<name>" += run time
-- ARGV[1]  the request's key
-- ARGV[2]  owner token of the executor that ran it ("" when it never ran, e.g. unknown task)
-- ARGV[3]  error (JSON)
-- ARGV[4]  "1" to memoize the error, "0" not to
-- ARGV[5]  record TTL (ms); 0 keeps it forever
-- ARGV[6]  mailbox TTL (ms)
-- ARGV[7]  mailbox not to notify (the inline runner's own, which has the error), or ""
-- ARGV[8]  "1" to fail it only if nobody has claimed it (still queued), else ""
-- ARGV[9]  graph TTL (ms)
--
-- Transition: anything but done, memoized failed or this run's cancellation (cancelled.lua)  ->
-- failed(error); its waits-for edges go.
-- A key that is not a hash (a corrupt record) is replaced, unless ARGV[8] is "1".
-- Each waiter's mailbox receives "failed:<key>:<error>".
-- Returns 1 stored, 0 already settled (nothing written); with KEYS[1..4] instead of 1:
-- {1, task name or "", run time (ms) if it ran else "", the waiters' mailboxes...}.

local rec = KEYS[1]
local f = redis.pcall('HMGET', rec, 'state', 'memo', 'name', 'started_at', 'cancelled_owner')
if f.err then
  -- Not a hash: a corrupt record, replaced by this outcome (which is the key's own).
  if ARGV[8] == '1' then
    return 0
  end
  redis.call('DEL', rec)
  f = {}
end
if f[1] == 'done' or (f[1] == 'failed' and (f[2] == '1' or f[5] == ARGV[2])) or (ARGV[8] == '1' and f[1] ~= 'queued') then
  return 0
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HDEL', rec, 'lease_until')
redis.call('HSET', rec, 'state', 'failed', 'error', ARGV[3], 'memo', ARGV[4],
  'ran_by', ARGV[2], 'finished_at', now)
if tonumber(ARGV[5]) > 0 then
  redis.call('PEXPIRE', rec, ARGV[5])
else
  redis.call('PERSIST', rec)
end
redis.call('DEL', KEYS[3])
if redis.call('PEXPIRE', KEYS[4], ARGV[9]) == 1 then
  redis.call('HSET', rec, 'subs', redis.call('HLEN', KEYS[4]))
end
local one, ran = #KEYS == 5, ''
if ARGV[2] ~= '' and f[1] == 'running' then
  ran = now - (tonumber(f[4]) or now)
end
if one and f[3] then
  redis.call('HINCRBY', KEYS[5], 'failures:' .. f[3], 1)
  if ran ~= '' then
    redis.call('HINCRBY', KEYS[5], 'runs:' .. f[3], 1)
    redis.call('HINCRBY', KEYS[5], 'ms:' .. f[3], ran)
  end
end
redis.call('SREM', KEYS[2], ARGV[7])
local mailboxes = redis.call('SMEMBERS', KEYS[2])
redis.call('DEL', KEYS[2])
if not one then
  local reply = {1, f[3] or '', f[3] and ran or ''}
  for i, mailbox in ipairs(mailboxes) do
    reply[3 + i] = mailbox
  end
  return reply
end
local entry = 'failed:' .. ARGV[1] .. ':' .. ARGV[3]
for _, mailbox in ipairs(mailboxes) do
  redis.call('RPUSH', mailbox, entry)
  redis.call('PEXPIRE', mailbox, ARGV[6])
end
return 1
