-- ferry list_ended: lists one job that an earlier build ended without listing it in
-- `kept_logs`, unless its stream grew since the caller read it.
--
-- KEYS[1]  {ns}:kept_logs    KEYS[2] {ns}:s:job:<job>
-- ARGV[1]  job id;  ARGV[2] the at_ms of its first terminal event;  ARGV[3] the stream's
--          length when the caller read it
-- Returns  1 when the job was listed, 0 when the stream grew meanwhile (a terminal event or a
--          `logs_expired` appended since lists or unlists the job itself) or it was listed.

if redis.call('XLEN', KEYS[2]) ~= tonumber(ARGV[3]) then
  return 0
end
return redis.call('ZADD', KEYS[1], 'NX', ARGV[2], ARGV[1])
