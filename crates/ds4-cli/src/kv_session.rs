//! Saving and resuming a conversation of the interactive chat as a ds4 `.kv` file
//! (ds4-spec.md §3): the KVC header, the detokenized session tokens as the text, and the
//! session payload. The same file is a valid entry of a `--kv-disk-dir` when named by the
//! SHA1 of its text; here the user picks the name.
//!
//! The chat transcript ends each reply with an EOS that the session never evaluates, so a
//! resumed transcript is the session's tokens plus that EOS when a reply has been made.

use std::fs;
use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context};
use ds4_gguf::reader::GgufFile;
use ds4_gguf::types::GgmlType;
use ds4_kvstore::store::{sha1, verify_file};
use ds4_kvstore::{ExtFlags, KvFile, KvFileHeader, SaveReason};
use ds4_model::backend::Session;
use ds4_model::config::ModelConfig;
use ds4_text::tokenizer::Tokenizer;

/// The KVC header's quant bits: 2 when the routed experts are IQ2_XXS, else 4.
pub fn routed_quant_bits(gguf: &GgufFile) -> u8 {
    let iq2 = gguf
        .tensors()
        .iter()
        .any(|t| t.name.ends_with("ffn_gate_exps.weight") && t.ty == GgmlType::IQ2XXS);
    if iq2 {
        2
    } else {
        4
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The detokenized text of `tokens` (the file's key; lossy where a token splits a character).
fn detokenize(tokenizer: &Tokenizer, tokens: &[u32]) -> Vec<u8> {
    let mut text = Vec::new();
    for &t in tokens {
        text.extend_from_slice(tokenizer.token_bytes(t).unwrap_or_default());
    }
    String::from_utf8_lossy(&text).into_owned().into_bytes()
}

/// The quant bits of the model file at `path` (re-read for its tensor table).
pub fn quant_bits_of(path: &Path) -> anyhow::Result<u8> {
    let gguf = GgufFile::open(path).with_context(|| format!("opening {}", path.display()))?;
    Ok(routed_quant_bits(&gguf))
}

/// Writes the session to `path` as a `.kv` file (through a temporary file and a rename, so a
/// failed save never leaves half a file under the name). `transcript` is the chat's, which
/// the session must be in step with. Returns the file's size.
pub fn save_session(
    path: &Path,
    session: &dyn Session,
    transcript: &[u32],
    tokenizer: &Tokenizer,
    quant_bits: u8,
) -> anyhow::Result<u64> {
    let tokens = session.tokens();
    if tokens.is_empty() {
        bail!("nothing to save: the conversation has not been processed yet (send a message)");
    }
    if !transcript.starts_with(tokens) {
        bail!("nothing to save: the session is out of step with the conversation (send a message)");
    }
    let payload = session.snapshot();
    if payload.is_empty() {
        bail!("the backend could not read the session state");
    }
    let now = unix_now();
    let file = KvFile {
        header: KvFileHeader {
            quant_bits,
            reason: SaveReason::Unknown,
            ext_flags: ExtFlags(0),
            tokens: tokens.len() as u32,
            hits: 0,
            ctx: session.ctx() as u32,
            created: now,
            last_used: now,
            payload_bytes: payload.len() as u64,
        },
        text: detokenize(tokenizer, tokens),
        payload,
        tool_map: Vec::new(),
    };
    let bytes = file.encode();
    let name = path
        .file_name()
        .with_context(|| format!("{} is not a file name", path.display()))?;
    let tmp = path.with_file_name(format!(
        ".{}.tmp.{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let written = fs::File::create(&tmp)
        .and_then(|mut f| f.write_all(&bytes).and_then(|_| f.sync_all()))
        .and_then(|_| fs::rename(&tmp, path));
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("writing {}", path.display()));
    }
    Ok(bytes.len() as u64)
}

/// Reads and fully validates a `.kv` file, restores it into `session` and returns the chat
/// transcript it stands for (the session's tokens, plus the EOS after the last reply). The
/// session is reset when the file does not fit it.
pub fn load_session(
    path: &Path,
    session: &mut dyn Session,
    cfg: &ModelConfig,
    tokenizer: &Tokenizer,
) -> anyhow::Result<Vec<u32>> {
    let bytes = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    // The text's digest stands in for the file name a cache directory would give it.
    let sha = match KvFile::decode(&bytes) {
        Ok(f) => sha1(&f.text),
        Err(e) => bail!("{}: {e}", path.display()),
    };
    let file =
        verify_file(cfg, &sha, &bytes).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    if file.header.tokens as usize >= session.ctx() {
        bail!(
            "{}: the conversation has {} tokens, the context is {} (use a larger --ctx)",
            path.display(),
            file.header.tokens,
            session.ctx()
        );
    }
    if let Err(e) = session.restore(&file.payload) {
        session.reset();
        bail!("{}: {e}", path.display());
    }
    let mut transcript = session.tokens().to_vec();
    if transcript.is_empty() {
        bail!("{}: the file holds no tokens", path.display());
    }
    let specials = tokenizer.specials();
    if transcript.contains(&specials.assistant) && transcript.last() != Some(&specials.eos) {
        transcript.push(specials.eos);
    }
    Ok(transcript)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ds4_model::backend::Logits;
    use std::sync::Arc;

    fn tiny() -> (Box<dyn ds4_model::backend::Backend>, Tokenizer, u8) {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/tiny-test-model.gguf");
        let gguf = Arc::new(GgufFile::open(&path).unwrap());
        let tokens = gguf.get_string_array("tokenizer.ggml.tokens").unwrap();
        let merges = gguf.get_string_array("tokenizer.ggml.merges").unwrap();
        let tokenizer = Tokenizer::from_gguf_vocab(tokens, merges).unwrap();
        let bits = routed_quant_bits(&gguf);
        let backend = crate::backend_select::load_backend(
            gguf,
            &path,
            "cpu".parse().unwrap(),
            ds4_model::numerics::Numerics::Ds4,
            4096,
        )
        .unwrap();
        (backend, tokenizer, bits)
    }

    fn scratch(name: &str) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("ds4-kv-session-{}-{name}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn resumed_conversation_gives_the_same_next_token_logits() {
        let (backend, tokenizer, bits) = tiny();
        let prompt = tokenizer.encode(
            "<｜begin▁of▁sentence｜>You are terse.<｜User｜>Name a fox.<｜Assistant｜></think>Red",
        );
        let mut live = backend.new_session(256).unwrap();
        live.eval(&prompt, Logits::Last).unwrap();
        let path = scratch("resume").join("chat.kv");
        let size = save_session(&path, live.as_ref(), live.tokens(), &tokenizer, bits).unwrap();
        assert_eq!(size, fs::metadata(&path).unwrap().len());

        let mut resumed = backend.new_session(256).unwrap();
        let transcript =
            load_session(&path, resumed.as_mut(), backend.config(), &tokenizer).unwrap();
        // A reply was made: the transcript closes it with EOS, which the session lacks.
        assert_eq!(&transcript[..prompt.len()], &prompt[..]);
        assert_eq!(transcript[prompt.len()..], [tokenizer.specials().eos]);
        assert_eq!(resumed.tokens(), live.tokens());
        assert_eq!(resumed.last_logits(), live.last_logits());
        // The next turn continues identically.
        let next = tokenizer.encode("<｜end▁of▁sentence｜><｜User｜>Again.");
        let a = live.eval(&next, Logits::Last).unwrap();
        let b = resumed.eval(&next, Logits::Last).unwrap();
        assert_eq!(a, b);
        let _ = fs::remove_dir_all(path.parent().unwrap());
    }

    #[test]
    fn damaged_or_mismatched_files_are_errors_naming_the_file() {
        let (backend, tokenizer, bits) = tiny();
        let dir = scratch("damaged");
        let path = dir.join("chat.kv");
        let mut live = backend.new_session(256).unwrap();
        live.eval(
            &tokenizer.encode("<｜begin▁of▁sentence｜>Hello there, fox."),
            Logits::Last,
        )
        .unwrap();
        save_session(&path, live.as_ref(), live.tokens(), &tokenizer, bits).unwrap();

        // Too small a context for the conversation.
        let mut small = backend.new_session(4).unwrap();
        let e = load_session(&path, small.as_mut(), backend.config(), &tokenizer).unwrap_err();
        assert!(e.to_string().contains("chat.kv"), "{e}");

        // Truncated.
        let bytes = fs::read(&path).unwrap();
        fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        let mut s = backend.new_session(256).unwrap();
        let e = load_session(&path, s.as_mut(), backend.config(), &tokenizer).unwrap_err();
        assert!(e.to_string().contains("chat.kv"), "{e}");
        assert!(s.tokens().is_empty());

        // Missing.
        let e = load_session(
            &dir.join("none.kv"),
            s.as_mut(),
            backend.config(),
            &tokenizer,
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains("none.kv"), "{e:#}");

        // An empty session cannot be saved.
        let empty = backend.new_session(256).unwrap();
        assert!(save_session(&dir.join("e.kv"), empty.as_ref(), &[], &tokenizer, bits).is_err());
        let _ = fs::remove_dir_all(&dir);
    }
}
