// Writes docs/ERRORS.md from src/errors.ts: node --import tsx scripts/errors-doc.ts
import { writeFileSync } from 'node:fs';
import { errorCodes } from '../src/errors.ts';

const rows = Object.entries(errorCodes).map(([code, { status, meaning }]) => `| \`${code}\` | ${status} | ${meaning} |`);
const doc = `# Error codes

Every error vmferry raises on purpose carries one of these stable codes (\`err.code\` in code, \`[VMF_…]\` at the end of a CLI error line, \`code\` in an HTTP error body). Scripts may rely on them. \`test/unit/errors.test.ts\` keeps this table in step with \`src/errors.ts\`; regenerate it with \`node --import tsx scripts/errors-doc.ts\`.

An HTTP API answers each code with the status in the second column: 4xx when the request cannot succeed as sent, 502/504 when a part vmferry drives (QEMU, another vmferry server, an external program) failed or timed out, 500 only for vmferry itself.

| code | HTTP status | meaning |
| --- | --- | --- |
${rows.join('\n')}
`;
writeFileSync(new URL('../docs/ERRORS.md', import.meta.url), doc);
