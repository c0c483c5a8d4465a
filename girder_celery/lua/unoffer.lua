-- unoffer: withdraw an offer whose message could not be published (the broker refused it or
-- was unreachable), so the request is not left queued with no message anywhere: the next
-- submit of it, by any waiter, offers it again at once.
--
-- KEYS[1]  request record          <prefix>:req:{<key>}         hash
-- KEYS[2]  the queue's offers      <prefix>:offers:{..}:<pool>  zset of keys by offer time (ms);
--                                  not given on a Redis Cluster (another slot): the caller
--                                  drops the entry (an index of the records) after this
-- ARGV[1]  the request's key
--
-- Transition: queued (offered) -> queued (never offered)
-- Returns 1 if withdrawn, 0 if it had moved on (claimed or settled meanwhile, or it is not a
-- hash: corrupt).

-- pcall: a key that is not a hash answers an error table, which is not 'queued' either.
if redis.pcall('HGET', KEYS[1], 'state') ~= 'queued' then
  return 0
end
redis.call('HSET', KEYS[1], 'offered_at', 0)
redis.call('HDEL', KEYS[1], 'offered_on')
if KEYS[2] then
  redis.call('ZREM', KEYS[2], ARGV[1])
end
return 1
