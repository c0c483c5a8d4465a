-- release: an executor gives a claimed request back to queued. Either for Celery's retry of a
-- message's run (autoretry_for, or self.retry()): the retry message Celery has just published is
-- the request's new offer, and the claim must not make that message look like a duplicate. Or
-- unfinished, with no message: an inline run that an enclosing run's time limit interrupted, or
-- one whose retry its waiter gave up on; the next submit of it offers it at once.
--
-- KEYS[1]  request record   <prefix>:req:{<key>}  hash
-- ARGV[1]  owner token of the claim being released
-- ARGV[2]  "1": an offer was just sent (offered now); "": none (never offered)
--
-- Transition: running(owner) -> queued (offered now, or never offered)
-- Returns 1 released, 0 not ours any more (its lease lapsed and another executor took it, or
-- the record is corrupt: not a hash).

local f = redis.pcall('HMGET', KEYS[1], 'state', 'owner')
if f.err or f[1] ~= 'running' or f[2] ~= ARGV[1] then
  return 0
end
redis.call('HDEL', KEYS[1], 'owner', 'lease_until', 'placement', 'claimed_via')
if ARGV[2] == '1' then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('HSET', KEYS[1], 'state', 'queued', 'offered_at', now)
  redis.call('HINCRBY', KEYS[1], 'offers', 1)
else
  redis.call('HSET', KEYS[1], 'state', 'queued', 'offered_at', 0)
end
return 1
