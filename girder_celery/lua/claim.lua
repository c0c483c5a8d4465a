-- claim: an executor takes a request to run it (invariant 1).
-- Only a queued request, or a running one whose owner's lease has expired, can be claimed;
-- anything else means the offer is stale or a duplicate and the function must not run.
-- A waiter looking for one of its own sub-requests to run inline names several, newest first,
-- and takes the first it can: one round trip for the whole scan.
--
-- KEYS[1..n]    request records   <prefix>:req:{<key>}  hash, in order of preference, in one
--                                 slot (on a Redis Cluster a scan names one slot's at a time)
-- ARGV[1]       owner: this claim's token, "<node>/<pid>/<nonce>"
-- ARGV[2]       node (the Celery worker's hostname)
-- ARGV[3]       lease (ms)
-- ARGV[4]       queue the offer came from, or "" for a waiter claiming its own sub-request
-- ARGV[5]       "<prefix>:offers:{..}:", to drop the offer from the queue that holds it; "" on a
--               Redis Cluster, where the offers are in another slot: the reply names the queue
--               and the caller drops it (store.py)
-- ARGV[6..5+n]  the requests' keys, as KEYS
--
-- Transition: queued | running with an expired lease  ->  running(owner, now + lease), with its
-- placement: "inline" (a waiter), "local" (from the queue it was offered on), "hoisted" (a copy).
-- Returns {verdict, data, attempts, i}: the first claimed, else the last one's verdict:
--   {"claimed", payload, attempts, i, queue}  run KEYS[i]; renew the lease while running; queue:
--                                      where its offer was, for the caller to drop (ARGV[5] "")
--   {"running", owner, "", n}          a live executor holds it: skip
--   {"done", "", "", n}                already done: skip
--   {"failed", "", "", n}              failed; only a new submit restarts it: skip
--   {"absent", "", "", n}              unknown to the store (forgotten, expired or lost)
--   {"corrupt", what, "", n}           not a record girder writes (not a hash, an unknown state,
--                                      a lease_until that is not a number): skip, nothing changed

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local function claim(i)
  local rec = KEYS[i]
  local f = redis.pcall('HMGET', rec, 'state', 'payload', 'owner', 'lease_until', 'pool', 'offered_on')
  if f.err then
    return {'corrupt', 'its key holds a ' .. redis.call('TYPE', rec).ok .. ', not a hash', ''}
  end
  local state = f[1]
  if not state then
    return {'absent', '', ''}
  end
  if state == 'running' then
    local lease_until = tonumber(f[4])
    if not lease_until then
      local shown = string.sub(f[4] or 'none', 1, 64)
      return {'corrupt', 'it is running, and its lease_until is not a number: ' .. shown, ''}
    end
    if lease_until > now then
      return {'running', f[3], ''}
    end
  elseif state ~= 'queued' then
    if state == 'done' or state == 'failed' then
      return {state, '', ''}
    end
    return {'corrupt', 'its state is unknown: ' .. string.sub(state, 1, 64), ''}
  end
  local placement = 'inline'
  if ARGV[4] ~= '' then
    placement = (ARGV[4] == f[5]) and 'local' or 'hoisted'
  end
  local queue = ''
  if f[6] then
    if ARGV[5] ~= '' then
      redis.call('ZREM', ARGV[5] .. f[6], ARGV[5 + i])
    else
      queue = f[6]
    end
    redis.call('HDEL', rec, 'offered_on')
  end
  redis.call('HSET', rec, 'state', 'running', 'owner', ARGV[1], 'node', ARGV[2],
    'lease_until', now + tonumber(ARGV[3]), 'started_at', now, 'placement', placement, 'claimed_via', ARGV[4])
  local attempts = redis.call('HINCRBY', rec, 'attempts', 1)
  return {'claimed', f[2], attempts, 0, queue}
end

local reply
for i = 1, #KEYS do
  reply = claim(i)
  reply[4] = i
  if reply[1] == 'claimed' then
    return reply
  end
end
return reply
