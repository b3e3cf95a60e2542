-- ferry lock renew: compare-and-renew of a leader lock.
--
-- KEYS[1]  {ns}:lock:<name>
-- ARGV[1]  holder;  ARGV[2] token;  ARGV[3] ttl ms
-- Returns  1 when the lock's value is `holder|token` (its expiry is reset to ttl), else 0.

if redis.call('GET', KEYS[1]) == ARGV[1] .. '|' .. ARGV[2] then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return 1
end
return 0
