-- ferry live_agents: the agents whose heartbeat deadline has not passed (store clock).
--
-- KEYS[1]  {ns}:agents (zset: agent name -> heartbeat deadline ms)
-- Returns  a flat array: agent name, deadline ms, ... (deadline >= now).

local now = now_ms()
return redis.call('ZRANGEBYSCORE', KEYS[1], int(now), '+inf', 'WITHSCORES')
