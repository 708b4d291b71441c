/**
 * Checks a value against a typebox schema and says, in a person's words, what
 * is wrong with the first field that does not fit: "disks[0].source.path must
 * be an absolute path (got "x")" rather than typebox's "Expected union value"
 * at a JSON pointer. The schema stays the one definition of the shape; this
 * only turns its first failure into a sentence:
 *
 * - a union of objects told apart by one literal property (`kind`, `type`) is
 *   followed into the variant the value names, or the property is the field
 *   that is wrong;
 * - a schema's `description` is what the value must be, when it has one;
 * - rules typebox's keywords cannot say (a length in bytes, a path refused for
 *   one of several reasons) are string formats registered with hostFormat(),
 *   whose problem function gives the words.
 */
import { FormatRegistry, Kind, type TSchema } from '@sinclair/typebox';
import { Value } from '@sinclair/typebox/value';
import type { ValueError } from '@sinclair/typebox/errors';

/** What is wrong with one field: `field` as a person writes it (disks[0].id, or (root)). */
export interface SchemaProblem {
  field: string;
  problem: string;
}

const formatProblems = new Map<string, (value: string) => string | undefined>();

/**
 * Registers a string format whose check is `problem(value) === undefined`, so
 * a rule and its words are one function. Returns the format's name, for a
 * schema's `format`. Only for schemas checked here: fastify's ajv knows none
 * of these formats.
 */
export function hostFormat(name: string, problem: (value: string) => string | undefined): string {
  const format = `vmferry-${name}`;
  FormatRegistry.Set(format, (value) => problem(value) === undefined);
  formatProblems.set(format, problem);
  return format;
}

/** A JSON pointer (/disks/0/source) as a field name (disks[0].source). */
function fieldName(pointer: string): string {
  if (pointer === '') return '(root)';
  return pointer
    .slice(1)
    .split('/')
    .map((part) => part.replace(/~1/g, '/').replace(/~0/g, '~'))
    .reduce((field, part) => (/^\d+$/.test(part) ? `${field}[${part}]` : field === '' ? part : `${field}.${part}`), '');
}

function got(value: unknown): string {
  if (value === undefined || (typeof value === 'object' && value !== null)) return '';
  const text = JSON.stringify(value);
  return ` (got ${text.length > 200 ? `${text.slice(0, 200)}…` : text})`;
}

function isRecord(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

/** `"a"`, `"a" or "b"`, `"a", "b" or "c"`. */
function oneOf(values: unknown[]): string {
  const texts = values.map((v) => JSON.stringify(v));
  return texts.length === 1 ? (texts[0] as string) : `${texts.slice(0, -1).join(', ')} or ${texts[texts.length - 1]}`;
}

/** The property that tells a union's object variants apart: one that is a literal in every variant. */
function discriminator(variants: TSchema[]): string | undefined {
  const first = variants[0];
  if (!first || first[Kind] !== 'Object') return undefined;
  return Object.keys(first.properties as Record<string, TSchema>).find((key) =>
    variants.every((variant) => variant[Kind] === 'Object' && (variant.properties as Record<string, TSchema>)[key]?.const !== undefined),
  );
}

/** The words for one typebox error whose schema is not a union of objects. */
function describe(error: ValueError): string {
  const { schema, value } = error;
  const must = (text: string): string => `must be ${text}${got(value)}`;
  switch (schema[Kind]) {
    case 'Integer':
      return must(`an integer from ${schema.minimum} to ${schema.maximum}`);
    case 'Boolean':
      return must('a boolean');
    case 'Object':
      return 'must be an object';
    case 'Array':
      if (!Array.isArray(value)) return 'must be an array';
      return `must have at most ${schema.maxItems} entries`;
    case 'String': {
      if (typeof value !== 'string') return 'must be a non-empty string';
      const problem = typeof schema.format === 'string' && value !== '' ? formatProblems.get(schema.format)?.(value) : undefined;
      if (problem !== undefined) return problem;
      if (schema.description !== undefined) return must(schema.description);
      if (value === '') return 'must be a non-empty string';
      if (schema.maxLength !== undefined && value.length > (schema.maxLength as number)) return `must be at most ${schema.maxLength} characters`;
      return must(`a string matching ${schema.pattern}`);
    }
    case 'Union':
      return must(schema.description ?? oneOf((schema.anyOf as TSchema[]).map((variant): unknown => variant.const)));
    default:
      return `is invalid: ${error.message}`;
  }
}

/** What is wrong with the first field of `value` that `schema` refuses; undefined when the value fits. */
export function schemaProblem(schema: TSchema, value: unknown): SchemaProblem | undefined {
  let error = Value.Errors(schema, value).First();
  while (error) {
    if (error.schema[Kind] !== 'Union') return { field: fieldName(error.path), problem: describe(error) };
    const variants = error.schema.anyOf as TSchema[];
    const key = discriminator(variants);
    if (key === undefined) return { field: fieldName(error.path), problem: describe(error) };
    if (!isRecord(error.value)) return { field: fieldName(error.path), problem: 'must be an object' };
    const tag = error.value[key];
    const index = variants.findIndex((variant) => (variant.properties as Record<string, TSchema>)[key]?.const === tag);
    if (index < 0) return { field: fieldName(`${error.path}/${key}`), problem: `must be ${oneOf(variants.map((v): unknown => (v.properties as Record<string, TSchema>)[key]?.const))}${got(tag)}` };
    error = error.errors[index]?.First();
  }
  return undefined;
}

/**
 * The value with only the properties the schema names (a field an older or
 * newer vmferry wrote is dropped, not carried on unchecked); call it only on
 * a value the schema accepts.
 */
export function schemaValue<T>(schema: TSchema, value: unknown): T {
  return Value.Clean(schema, Value.Clone(value)) as T;
}
