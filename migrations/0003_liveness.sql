-- apijongler schema, version 3: holders judged by what the OS proves, ages on a clock that cannot step.
--
-- A holder the OS can see (same host, boot and pid namespace) keeps its key while it runs, whatever its
-- heartbeat's age; heartbeat ages are compared on CLOCK_BOOTTIME, which every process of one boot shares
-- and which no NTP step or `date -s` moves. `heartbeat_at` stays the wall-clock time, for people.
ALTER TABLE keys ADD COLUMN holder_pid_namespace TEXT;  -- inode of the holder's /proc/self/ns/pid
ALTER TABLE keys ADD COLUMN heartbeat_boot_ms    INTEGER; -- CLOCK_BOOTTIME ms of the last heartbeat

-- The file says it is apijongler's, so a tool (or apijongler) can tell it from another application's.
PRAGMA application_id = 1095388743; -- "AJNG"
