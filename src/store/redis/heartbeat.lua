-- ferry heartbeat: marks an agent live until now + ttl (store clock).
--
-- KEYS[1]  {ns}:agents (zset: agent name -> heartbeat deadline ms)
-- ARGV[1]  agent name;  ARGV[2] ttl ms
-- Returns  the new deadline ms = now + ttl.

local deadline = now_ms() + tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], int(deadline), ARGV[1])
return deadline
