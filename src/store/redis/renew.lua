-- ferry renew: compare-and-renew of a step lease.
--
-- KEYS[1]  {ns}:lease:<job>/<step>    KEYS[2] {ns}:leases
-- ARGV[1]  member `<job>/<step>`;  ARGV[2] token;  ARGV[3] ttl ms
-- Returns  the new deadline ms (store clock) = now + ttl.
-- Errors   'FERRY_STALE <reason>' unless the lease exists, carries the token and has not
--          run out.

local now = now_ms()
local err = check_lease(KEYS[1], ARGV[2], now)
if err then return err end
local deadline = now + tonumber(ARGV[3])
redis.call('HSET', KEYS[1], 'deadline', int(deadline))
redis.call('ZADD', KEYS[2], int(deadline), ARGV[1])
return deadline
