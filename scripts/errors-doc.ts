// Writes docs/ERRORS.md from src/errors.ts: node --import tsx scripts/errors-doc.ts
import { writeFileSync } from 'node:fs';
import { errorCodes } from '../src/errors.ts';

const rows = Object.entries(errorCodes).map(([code, meaning]) => `| \`${code}\` | ${meaning} |`);
const doc = `# Error codes

Every error vmferry raises on purpose carries one of these stable codes (\`err.code\` in code, \`[VMF_…]\` at the end of a CLI error line, \`code\` in an HTTP error body). Scripts may rely on them. \`test/unit/errors.test.ts\` keeps this table in step with \`src/errors.ts\`; regenerate it with \`node --import tsx scripts/errors-doc.ts\`.

| code | meaning |
| --- | --- |
${rows.join('\n')}
`;
writeFileSync(new URL('../docs/ERRORS.md', import.meta.url), doc);
