-- ferry lock release: compare-and-delete of a leader lock.
--
-- KEYS[1]  {ns}:lock:<name>
-- ARGV[1]  holder;  ARGV[2] token
-- Returns  1 when the lock's value was `holder|token` (it is deleted), else 0.

if redis.call('GET', KEYS[1]) == ARGV[1] .. '|' .. ARGV[2] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
