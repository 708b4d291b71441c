// The throwaway PostgreSQL lives with the demo (`vmferry demo --ha` starts one too); tests import it from here.
export { startPostgres, type TestPostgres } from '../../src/demo/postgres.ts';
