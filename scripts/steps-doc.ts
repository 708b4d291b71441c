// Writes the table of migration steps in docs/ARCHITECTURE.md from the code's own table
// (migrationSteps in src/migration/phases.ts), between two markers:
//   node --import tsx scripts/steps-doc.ts
// test/unit/steps-doc.test.ts keeps the two in step.
import { readFileSync, writeFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { migrationSteps } from '../src/migration/phases.ts';

const begin = '<!-- steps: generated from src/migration/phases.ts by scripts/steps-doc.ts -->';
const end = '<!-- /steps -->';
export const architectureDoc = new URL('../docs/ARCHITECTURE.md', import.meta.url);

export function stepsTable(): string {
  const rows = migrationSteps.map((s) => `| \`${s.phase}\` | ${s.step} | ${s.undo} | ${s.pastNoReturn ? 'yes' : 'no'} | ${s.final ? 'yes' : 'no'} |`);
  return ['| phase (stored before the step) | step | what undoes it | past the point of no return | final |', '|---|---|---|---|---|', ...rows].join('\n');
}

/** The table between the markers of `doc`, or undefined when they are missing. */
export function currentStepsTable(doc: string): string | undefined {
  const from = doc.indexOf(begin);
  const to = doc.indexOf(end);
  return from < 0 || to < from ? undefined : doc.slice(from + begin.length, to).trim();
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const doc = readFileSync(architectureDoc, 'utf8');
  const from = doc.indexOf(begin);
  const to = doc.indexOf(end);
  if (from < 0 || to < from) throw new Error(`docs/ARCHITECTURE.md lacks the markers ${begin} … ${end}`);
  writeFileSync(architectureDoc, `${doc.slice(0, from + begin.length)}\n${stepsTable()}\n${doc.slice(to)}`);
}
