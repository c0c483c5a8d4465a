-- renew: extend the leases an executor's process holds on the requests it is running, and the
-- waits-for edges of those requests with them: an edge lives exactly as long as its lease, so a
-- request busy for hours running a sub-request inline still shows what it waits for (invariant
-- 5). A lease that is no longer ours (expired and reclaimed, or settled) is not touched; the
-- caller learns it lost the lease.
--
-- KEYS[1..n]     request records   <prefix>:req:{<key>}  hash
-- KEYS[n+1..2n]  their edges       <prefix>:waits:{<key>}  set of keys
-- ARGV[1]        lease (ms)
-- ARGV[2..n+1]   the owner token that claimed KEYS[i]
-- ARGV[n+2]      edge TTL (ms)
--
-- Transition: running(owner) -> running(owner, now + lease)
-- Returns a list of n integers: 1 renewed, 0 lost.

local n = #KEYS / 2
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease_until = now + tonumber(ARGV[1])
local out = {}
for i = 1, n do
  -- pcall: a key that is not a hash (a corrupt record) is lost, and must not stop the others.
  local f = redis.pcall('HMGET', KEYS[i], 'state', 'owner')
  if not f.err and f[1] == 'running' and f[2] == ARGV[i + 1] then
    redis.call('HSET', KEYS[i], 'lease_until', lease_until)
    redis.call('PEXPIRE', KEYS[n + i], ARGV[n + 2])
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
