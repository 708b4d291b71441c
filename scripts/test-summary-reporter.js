// A node:test reporter for scripts/run-tests.js: it prints nothing while the tests run (the spec
// reporter does that) and, when the runner ends, writes one JSON object to its destination: every
// failed test with its file and error, and each test file's wall time. run-tests.js turns the
// objects of both runners into the summary at the very end of npm test's output, where a CI log's
// tail shows it.
import { inspect } from 'node:util';

/** Lines of an error kept for the summary: enough for an assertion's diff, short enough to read in a CI tail. */
const errorLines = 20;
/** Lines of a file's own stderr kept for a file that failed without a failing test (it crashed on import, say). */
const stderrLines = 20;

export default async function* summaryReporter(source) {
  const failures = [];
  const files = [];
  /** The last lines each file wrote to stderr, for a file that fails outside any test. */
  const stderrTails = new Map();
  for await (const { type, data } of source) {
    if (type === 'test:stderr' && data.file) {
      const tail = stderrTails.get(data.file) ?? [];
      tail.push(...data.message.replace(/\n$/, '').split('\n'));
      stderrTails.set(data.file, tail.slice(-stderrLines));
    } else if (type === 'test:complete' && data.nesting === 0 && data.name === data.file) {
      // The runner's own test for a whole file: its duration is the file's wall time, child process included.
      files.push({ file: data.file, seconds: data.details.duration_ms / 1000 });
    } else if (type === 'test:fail' && data.details.error?.failureType !== 'subtestsFailed') {
      // A parent failed only because a subtest did: that subtest is listed itself.
      const fileItself = data.name === data.file;
      failures.push({
        file: data.file,
        name: fileItself ? '(the file itself, outside any test)' : data.name,
        error: fileItself ? (stderrTails.get(data.file) ?? ['(nothing on stderr)']) : describe(data.details.error),
      });
    }
  }
  yield `${JSON.stringify({ failures, files })}\n`;
}

/** The error a test failed with, as lines: the message (an assertion's diff included), actual and expected, where it was thrown. */
function describe(error) {
  const cause = error?.cause ?? error;
  if (!(cause instanceof Error)) return (typeof cause === 'string' ? cause : inspect(cause)).split('\n').slice(0, errorLines);
  const lines = `${cause.name}${cause.code ? ` [${cause.code}]` : ''}: ${cause.message}`.split('\n');
  // An assertion with a message of the test's own (assert.equal(code, 0, stderr)) does not show the values in it.
  if (cause.code === 'ERR_ASSERTION' && cause.generatedMessage === false) {
    lines.push(`  actual: ${inspect(cause.actual, { breakLength: Infinity })}`, `  expected: ${inspect(cause.expected, { breakLength: Infinity })}`, `  operator: ${cause.operator}`);
  }
  const where = (cause.stack ?? '').split('\n').find((line) => /^\s+at /.test(line) && !/\(node:|at node:|node_modules/.test(line));
  if (where) lines.push(where.trim());
  return lines.length > errorLines ? [...lines.slice(0, errorLines - 1), `… (${lines.length - errorLines + 1} more lines)`] : lines;
}
