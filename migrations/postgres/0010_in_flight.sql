-- An execute attempt that may send requests out of the host records that it started, and until
-- when it may still be sending them (ms since the Unix epoch), before it calls: if its result
-- never commits (a cancel took the saga over, the host died), the step is compensated, and not
-- before this time. NULL: no such attempt is in flight.
ALTER TABLE saga_steps ADD COLUMN in_flight_until BIGINT;
