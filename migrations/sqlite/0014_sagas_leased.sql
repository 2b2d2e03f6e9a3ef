-- Sagas by the process that holds them: a process gives back every claim it holds as it
-- stops, and those of a previous process with its identity as it starts
-- (`SagaStore::release_owner`). Without it that statement read every saga kept: 0.7 s at half a
-- million on SQLite, seconds at millions, holding the one writer and delaying a start, or
-- outlasting a stop's grace. Partial: only the sagas held right now (a few hundred per host)
-- are in it. One more index entry per claim and per creation (a saga is born claimed).
CREATE INDEX sagas_leased ON sagas (lease_owner) WHERE lease_owner IS NOT NULL;
