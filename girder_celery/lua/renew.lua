-- renew: extend the leases an executor's process holds on the requests it is running.
-- A lease that is no longer ours (expired and reclaimed, or the request finished) is not
-- touched; the caller learns it lost the lease.
--
-- KEYS[1..n]    request records   <prefix>:req:<key>  hash
-- ARGV[1]       lease (ms)
-- ARGV[2..n+1]  the owner token that claimed KEYS[i]
--
-- Transition: running(owner) -> running(owner, now + lease)
-- Returns a list of n integers: 1 renewed, 0 lost.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease_until = now + tonumber(ARGV[1])
local out = {}
for i, rec in ipairs(KEYS) do
  local f = redis.call('HMGET', rec, 'state', 'owner')
  if f[1] == 'running' and f[2] == ARGV[i + 1] then
    redis.call('HSET', rec, 'lease_until', lease_until)
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
