// How numbers, money and times read in the console.

const integer = new Intl.NumberFormat("en-US", { maximumFractionDigits: 0 });
const oneDecimal = new Intl.NumberFormat("en-US", { minimumFractionDigits: 1, maximumFractionDigits: 1 });
const compact = new Intl.NumberFormat("en-US", { notation: "compact", maximumFractionDigits: 1 });

export function count(value) {
  return value === null || value === undefined ? "–" : integer.format(value);
}

export function short(value) {
  return value === null || value === undefined ? "–" : compact.format(value);
}

export function ms(value) {
  return value === null || value === undefined ? "–" : `${oneDecimal.format(value)} ms`;
}

/** A cost as the API sends it (a decimal string, or null: no price) in dollars. */
export function usd(value, places = 6) {
  if (value === null || value === undefined || value === "") return "–";
  const number = Number(value);
  if (!Number.isFinite(number)) return String(value);
  return `$${number.toLocaleString("en-US", { minimumFractionDigits: places, maximumFractionDigits: places })}`;
}

/** Dollars for a headline: cents once it is over a dollar, else 4 places. */
export function usdShort(value) {
  if (value === null || value === undefined || value === "") return "–";
  const number = Number(value);
  return usd(value, Math.abs(number) >= 1 ? 2 : 4);
}

export function percent(part, whole) {
  if (!whole) return "–";
  const value = (100 * part) / whole;
  return `${value < 10 ? value.toFixed(2) : value.toFixed(1)}%`;
}

/** An ISO time as "2025-01-31 12:00:05 UTC" (the console speaks UTC, as the usage rollups do). */
export function utc(iso, { seconds = true } = {}) {
  if (!iso) return "–";
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) return String(iso);
  const text = date.toISOString().replace("T", " ");
  return `${seconds ? text.slice(0, 19) : text.slice(0, 16)} UTC`;
}

export function clock(iso) {
  if (!iso) return "–";
  const date = new Date(iso);
  return Number.isNaN(date.getTime()) ? String(iso) : date.toISOString().slice(11, 23);
}

/** An ISO time without milliseconds, as `ext-proc usage --since/--until` takes it. */
export function isoSeconds(date) {
  return `${date.toISOString().slice(0, 19)}Z`;
}
