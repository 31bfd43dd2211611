// Label masks: a PNG's class ids, read exactly as the service reads them (a greyscale pixel's value, a palette
// PNG's index), and coloured by a model's classes.
//
// A browser's own decoding (<img>, createImageBitmap) gives colours, not ids: a palette PNG decodes to its
// palette's colours and a 16-bit one to 8 bits. So the file is decoded here: chunks, zlib through the browser's
// DecompressionStream, scanline filters, then the ids sampled (nearest) into at most maxSide × maxSide. Rows are
// unfiltered as they inflate, so a large mask never sits whole in memory.

const SIGNATURE = [137, 80, 78, 71, 13, 10, 26, 10];

export class MaskDecodeError extends Error {}

function readChunks(bytes) {
  for (let i = 0; i < 8; i++) {
    if (bytes[i] !== SIGNATURE[i]) throw new MaskDecodeError("not a PNG file");
  }
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  let header = null;
  const data = [];
  for (let pos = 8; pos + 8 <= bytes.length;) {
    const length = view.getUint32(pos);
    const type = String.fromCharCode(...bytes.subarray(pos + 4, pos + 8));
    const body = bytes.subarray(pos + 8, pos + 8 + length);
    if (type === "IHDR") {
      header = {width: view.getUint32(pos + 8), height: view.getUint32(pos + 12), depth: body[8],
                colour: body[9], interlace: body[12]};
    } else if (type === "IDAT") {
      data.push(body);
    } else if (type === "IEND") {
      break;
    }
    pos += 12 + length;
  }
  if (!header) throw new MaskDecodeError("not a valid PNG (no IHDR)");
  if (header.colour !== 0 && header.colour !== 3) {
    const channels = {2: 3, 4: 2, 6: 4}[header.colour] || "several";
    throw new MaskDecodeError(`must have one channel (class ids); this PNG has ${channels}`);
  }
  if (header.interlace !== 0) throw new MaskDecodeError("is interlaced: no preview (the service still reads it)");
  if (![1, 2, 4, 8, 16].includes(header.depth) || (header.colour === 3 && header.depth === 16)) {
    throw new MaskDecodeError(`has an unsupported bit depth ${header.depth}`);
  }
  if (!data.length) throw new MaskDecodeError("has no image data");
  return {header, data};
}

function paeth(a, b, c) {
  const p = a + b - c, pa = Math.abs(p - a), pb = Math.abs(p - b), pc = Math.abs(p - c);
  return pa <= pb && pa <= pc ? a : (pb <= pc ? b : c);
}

function unfilter(type, row, prev, bpp) {
  const n = row.length;
  switch (type) {
    case 0: break;
    case 1: for (let i = bpp; i < n; i++) row[i] = (row[i] + row[i - bpp]) & 255; break;
    case 2: for (let i = 0; i < n; i++) row[i] = (row[i] + prev[i]) & 255; break;
    case 3:
      for (let i = 0; i < n; i++) row[i] = (row[i] + ((i >= bpp ? row[i - bpp] : 0) + prev[i] >> 1)) & 255;
      break;
    case 4:
      for (let i = 0; i < n; i++) {
        row[i] = (row[i] + paeth(i >= bpp ? row[i - bpp] : 0, prev[i], i >= bpp ? prev[i - bpp] : 0)) & 255;
      }
      break;
    default: throw new MaskDecodeError(`has a corrupt scanline (filter ${type})`);
  }
}

/**
 * Decode a label PNG (a Blob or ArrayBuffer).
 * @returns {{width, height, outWidth, outHeight, ids: Uint16Array, counts: Map<number, number>}} the file's
 *   size, the sampled size (≤ maxSide), the sampled ids row by row, and every id's pixel count over the whole file.
 */
export async function decodeLabelPng(source, maxSide = Infinity) {
  const bytes = new Uint8Array(source instanceof Blob ? await source.arrayBuffer() : source);
  const {header, data} = readChunks(bytes);
  const {width, height, depth} = header;
  if (!width || !height) throw new MaskDecodeError("has no pixels");
  const scale = Math.min(1, maxSide / Math.max(width, height));
  const outWidth = Math.max(1, Math.round(width * scale)), outHeight = Math.max(1, Math.round(height * scale));
  const rowBytes = Math.ceil(width * depth / 8), bpp = Math.max(1, depth >> 3);
  const targetRow = new Int32Array(height).fill(-1);
  for (let oy = 0; oy < outHeight; oy++) targetRow[Math.min(height - 1, Math.floor((oy + 0.5) * height / outHeight))] = oy;
  const sourceCol = new Uint32Array(outWidth);
  for (let ox = 0; ox < outWidth; ox++) sourceCol[ox] = Math.min(width - 1, Math.floor((ox + 0.5) * width / outWidth));
  const ids = new Uint16Array(outWidth * outHeight);
  const counts = new Float64Array(depth === 16 ? 65536 : 256);
  const mask = (1 << depth) - 1;
  const value = depth === 8 ? (row, x) => row[x]
    : depth === 16 ? (row, x) => (row[2 * x] << 8) | row[2 * x + 1]
    : (row, x) => (row[(x * depth) >> 3] >> (8 - depth - ((x * depth) & 7))) & mask;

  let prev = new Uint8Array(rowBytes), row = new Uint8Array(rowBytes);
  let filter = -1, filled = 0, y = 0;
  const finishRow = () => {
    unfilter(filter, row, prev, bpp);
    if (depth === 8) {
      for (let x = 0; x < width; x++) counts[row[x]]++;
    } else {
      for (let x = 0; x < width; x++) counts[value(row, x)]++;
    }
    const oy = targetRow[y];
    if (oy >= 0) {
      const base = oy * outWidth;
      for (let ox = 0; ox < outWidth; ox++) ids[base + ox] = value(row, sourceCol[ox]);
    }
    [prev, row] = [row, prev];
    filter = -1; filled = 0; y++;
  };
  const stream = new Blob(data).stream().pipeThrough(new DecompressionStream("deflate"));
  const reader = stream.getReader();
  try {
    for (;;) {
      const {done, value: chunk} = await reader.read();
      if (done) break;
      for (let i = 0; i < chunk.length && y < height;) {
        if (filter < 0) { filter = chunk[i++]; continue; }
        const take = Math.min(rowBytes - filled, chunk.length - i);
        row.set(chunk.subarray(i, i + take), filled);
        filled += take; i += take;
        if (filled === rowBytes) finishRow();
      }
      if (y >= height) { await reader.cancel(); break; }
    }
  } catch (err) {
    if (err instanceof MaskDecodeError) throw err;
    throw new MaskDecodeError(`has corrupt image data (${err.message})`);
  }
  if (y < height) throw new MaskDecodeError(`is truncated (${y} of ${height} rows)`);
  const present = new Map();
  counts.forEach((n, id) => { if (n) present.set(id, n); });
  return {width, height, outWidth, outHeight, ids, counts: present};
}

// Colours of the tissue classes the service's models paint, by name; other names get a colour by id.
const NAMED_COLOURS = [
  [/unknown|not requested|null/i, [70, 70, 70]],
  [/glass|background/i, [236, 236, 236]],
  [/stroma/i, [230, 120, 160]],
  [/necros/i, [250, 200, 90]],
  [/carcinoma|tumou?r|cancer|malignan/i, [120, 40, 140]],
  [/fat|vessel|other|normal|benign/i, [90, 170, 220]],
];

function hueColour(id) {
  const h = (id * 137.508) % 360 / 60, s = 0.65, l = 0.55;
  const c = (1 - Math.abs(2 * l - 1)) * s, x = c * (1 - Math.abs(h % 2 - 1)), m = l - c / 2;
  const [r, g, b] = [[c, x, 0], [x, c, 0], [0, c, x], [0, x, c], [x, 0, c], [c, 0, x]][Math.floor(h) % 6];
  return [r, g, b].map((v) => Math.round((v + m) * 255));
}

/** The model's classes (GET /models `classes`: id → name) → Map id → {name, rgb, unknown}. */
export function classColours(classes) {
  const out = new Map(), used = new Set();
  for (const [key, name] of Object.entries(classes || {}).sort((a, b) => a[0] - b[0])) {
    const id = Number(key);
    let rgb = null;
    for (const [pattern, colour] of NAMED_COLOURS) {
      if (pattern.test(name) && !used.has(colour.join())) { rgb = colour; break; }
    }
    rgb = rgb || hueColour(id);
    used.add(rgb.join());
    out.set(id, {name, rgb, unknown: NAMED_COLOURS[0][0].test(name)});
  }
  return out;
}

export const NOT_A_CLASS = [255, 0, 255];  // ids the model does not have (the service refuses such a mask)

/**
 * ImageData of the decoded ids coloured by `colours` (classColours). `transparentUnknown`: the unknown class
 * (and ids that are no class) drawn transparent, for an overlay on the slide.
 */
export function colourise(decoded, colours, {transparentUnknown = false, alpha = 255} = {}) {
  const {outWidth, outHeight, ids} = decoded;
  const image = new ImageData(outWidth, outHeight);
  const px = image.data;
  const lut = new Map();
  for (let i = 0; i < ids.length; i++) {
    const id = ids[i];
    let rgba = lut.get(id);
    if (!rgba) {
      const cls = colours.get(id);
      const hidden = transparentUnknown && (!cls || cls.unknown);
      rgba = [...(cls ? cls.rgb : NOT_A_CLASS), hidden ? 0 : alpha];
      lut.set(id, rgba);
    }
    const o = 4 * i;
    px[o] = rgba[0]; px[o + 1] = rgba[1]; px[o + 2] = rgba[2]; px[o + 3] = rgba[3];
  }
  return image;
}
