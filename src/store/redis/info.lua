-- ferry info: the server's INFO sections `memory` and `persistence`, read through a script so
-- that the command goes to the server holding the namespace's hash slot (in a cluster, the
-- master of its slot) and needs no CONFIG permission (often renamed or denied by hosted Redis).
--
-- KEYS[1]  {ns}:log (only for routing: nothing is read or written)
-- Returns  the two sections' text, as INFO returns it (`name:value` lines).

return redis.call('INFO', 'memory') .. redis.call('INFO', 'persistence')
