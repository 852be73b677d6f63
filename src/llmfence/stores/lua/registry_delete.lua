-- registry_delete.lua: delete a user, team, customer or budget tier record and its index entry.
--
-- KEYS[1]   the record   KEYS[2] the index of its kind's ids (see record_create.lua)
-- ARGV[1]   the record's id
-- Returns 1 if it was deleted, 0 if there was none.

redis.call('ZREM', KEYS[2], ARGV[1])
return redis.call('DEL', KEYS[1])
