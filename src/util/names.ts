/**
 * The one rule for names users give to VMs and shared volumes: they become
 * file names, NBD export names and QMP ids, so only lower-case letters,
 * digits, '.', '-' and '_', starting with a letter or digit, at most 63.
 */
export const namePatternSource = '^[a-z0-9][a-z0-9._-]{0,62}$';
export const namePattern = new RegExp(namePatternSource);
export const nameRule = "1-63 characters of a-z, 0-9, '.', '-', '_', starting with a letter or digit";
