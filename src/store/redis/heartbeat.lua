-- ferry heartbeat: marks an agent live until now + ttl (store clock), and says whether a stop
-- was requested of it and whether it is paused.
--
-- KEYS[1]  {ns}:agents (zset: agent name -> heartbeat deadline ms)
-- KEYS[2]  {ns}:stop:<agent> (the reason of a pending stop request; set and deleted by the
--          append script's agent effects)
-- KEYS[3]  {ns}:pause:<agent> (the reason of a pause; set and deleted by the append script)
-- ARGV[1]  agent name;  ARGV[2] ttl ms
-- Returns  {new deadline ms = now + ttl, the stop request's reason or false, the pause's
--          reason or false}.

local deadline = now_ms() + tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], int(deadline), ARGV[1])
return {deadline, redis.call('GET', KEYS[2]), redis.call('GET', KEYS[3])}
