-- The W3C traceparent of the saga's intake span (OpenTelemetry): every later span of the saga
-- is its child, so one saga is one trace across restarts and replicas. NULL: created with
-- tracing off.
ALTER TABLE sagas ADD COLUMN trace_parent TEXT;
