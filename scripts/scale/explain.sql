-- mindroom-billing scale: the real plans of every hot-path statement (scripts/scale.sh explain).
-- Calls the store's SQL functions with realistic arguments, inside transactions that are rolled
-- back (the database stays as filled), with auto_explain logging the plan of each statement inside
-- them (ANALYZE, BUFFERS) to this client. The calls run twice so (warm: plpgsql compiled, plans
-- cached; the second pass is the one to read), then a third time under a plain EXPLAIN ANALYZE for
-- their own execution times. psql variables: sub, acc (an active subscription and its account).
\set ON_ERROR_STOP on
load 'auto_explain';
set auto_explain.log_min_duration = 0;
set auto_explain.log_nested_statements = on;
set auto_explain.log_analyze = on;
set auto_explain.log_buffers = on;
set auto_explain.log_timing = on;
set auto_explain.log_format = text;
set client_min_messages = log;
set synchronous_commit = off;

\set ex ''
\set pass 1
\ir explain_calls.sql
\echo '#### warm pass'
\set pass 2
\ir explain_calls.sql
-- The calls' own times, without auto_explain's cost of logging every nested statement.
\echo '#### timing pass'
set auto_explain.log_min_duration = -1;
\set ex 'explain (analyze, buffers, costs off)'
\set pass 3
\ir explain_calls.sql
