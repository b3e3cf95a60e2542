-- ferry raise fence: the fencing token counter becomes at least ARGV[1] (never lower).
--
-- KEYS[1]  {ns}:fence
-- ARGV[1]  the least value the counter must have
-- Returns  the counter's value afterwards, as a string.

local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if current < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[1])
  return ARGV[1]
end
return string.format('%d', current)
