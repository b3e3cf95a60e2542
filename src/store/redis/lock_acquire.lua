-- ferry lock acquire: SET NX PX semantics with a fencing token from the shared counter.
--
-- KEYS[1]  {ns}:lock:<name>    KEYS[2] {ns}:fence
-- ARGV[1]  holder;  ARGV[2] ttl ms
-- Returns  the new token when the lock was free (value becomes `holder|token`, expiring after
--          ttl), nil when someone holds it.

if redis.call('EXISTS', KEYS[1]) == 1 then
  return nil
end
local token = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1] .. '|' .. token, 'PX', ARGV[2])
return token
