//! Decoding isolated from the worker. Image codecs are large bodies of C and C-translated
//! code; a hospital archive holds files nobody has tried them on. Every file is therefore
//! decoded by a child process (this same program, started with [`CHILD_FLAG`]) under a memory
//! cap, within a time limit: a panic, abort, crash, runaway allocation or hang in a codec costs
//! that one file, which is skipped with what happened, and the next file goes to a fresh child.
//!
//! The child speaks JSON lines on its standard streams: it announces itself, then answers one
//! [`Request`] with one [`Decoded`]. Its standard error is kept (the last lines) so that a
//! crash's own words reach the skip reason.

use crate::data::{self, DataError, Decoded, Image, Request};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The first argument that turns a Consilium program into a decoding child.
pub const CHILD_FLAG: &str = "--consilium-decode-files";
/// Bumped when requests or answers change shape; a child of another version is refused.
const PROTOCOL: u32 = 1;
/// Lines of the child's standard error kept for a crash's skip reason.
const STDERR_LINES: usize = 8;

/// A child's answers to one request: the file's format as soon as it is known (so that a
/// crash in the codec still says which format crashed), then the images or the reason.
#[derive(Serialize, Deserialize)]
#[serde(tag = "answer", rename_all = "snake_case")]
enum Answer {
    Header {
        format: String,
        modality: Option<String>,
    },
    Done {
        images: Result<Vec<Image>, String>,
    },
}

/// The limits on decoding one file (`[dataset.decoding]` in the worker configuration).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DecodeLimits {
    /// A file whose decoding takes longer is skipped (its child is killed).
    #[serde(default = "default_timeout")]
    pub timeout_seconds: u64,
    /// The decoding child's address space; a file that needs more is skipped.
    #[serde(default = "default_memory")]
    pub max_memory_mib: u64,
}

fn default_timeout() -> u64 {
    120
}

fn default_memory() -> u64 {
    4096
}

impl Default for DecodeLimits {
    fn default() -> Self {
        DecodeLimits {
            timeout_seconds: default_timeout(),
            max_memory_mib: default_memory(),
        }
    }
}

impl DecodeLimits {
    /// Refuses limits that would make every file fail or none be contained.
    pub fn check(&self) -> Result<(), String> {
        if !(1..=86_400).contains(&self.timeout_seconds) {
            return Err(format!(
                "dataset.decoding.timeout_seconds is {}: give 1 to 86400 seconds",
                self.timeout_seconds
            ));
        }
        if !(256..=1_048_576).contains(&self.max_memory_mib) {
            return Err(format!(
                "dataset.decoding.max_memory_mib is {}: give 256 to 1048576 MiB",
                self.max_memory_mib
            ));
        }
        Ok(())
    }
}

/// Which program decodes: a Consilium binary whose `main` calls [`serve_if_child`] first.
#[derive(Clone, Debug)]
pub struct Decoder {
    program: PathBuf,
}

impl Decoder {
    /// The running program (the worker or server binary).
    pub fn this_program() -> Result<Self, DataError> {
        let program = std::env::current_exe().map_err(|e| DataError::Decoder {
            reason: format!("cannot find this program to start its decoder: {e}"),
        })?;
        Ok(Decoder { program })
    }

    /// Another Consilium binary (tests use the built `consilium-worker`).
    pub fn program(path: impl Into<PathBuf>) -> Self {
        Decoder {
            program: path.into(),
        }
    }

    /// A session that decodes files one by one, restarting its child after a failure.
    pub fn session(&self, limits: DecodeLimits) -> Session<'_> {
        Session {
            program: &self.program,
            limits,
            child: None,
        }
    }
}

struct Running {
    child: Child,
    stdin: ChildStdin,
    answers: Receiver<std::io::Result<String>>,
    stderr: Arc<Mutex<VecDeque<String>>>,
}

/// Files decoded in order by one child at a time.
pub struct Session<'a> {
    program: &'a Path,
    limits: DecodeLimits,
    child: Option<Running>,
}

impl Session<'_> {
    /// Decodes one file. A failure of the file (however the codec fails) is in the answer; an
    /// error is returned only when no decoder can be started at all.
    pub fn decode(&mut self, request: &Request) -> Result<Decoded, DataError> {
        let mut running = match self.child.take() {
            Some(r) => r,
            None => self.start()?,
        };
        let line = serde_json::to_string(request).map_err(|e| DataError::Decoder {
            reason: format!("cannot encode a decoding request: {e}"),
        })?;
        if let Err(e) = writeln!(running.stdin, "{line}").and_then(|()| running.stdin.flush()) {
            // The child died between files: its words say why; try this file in a new one.
            let why = finish(running, None);
            tracing::warn!(reason = %why, "the decoder had stopped; starting another");
            running = self.start()?;
            writeln!(running.stdin, "{line}")
                .and_then(|()| running.stdin.flush())
                .map_err(|e2| DataError::Decoder {
                    reason: format!("the decoder does not take requests: {e}; then {e2}"),
                })?;
        }
        let deadline = Instant::now() + Duration::from_secs(self.limits.timeout_seconds);
        let mut decoded = Decoded::failed(String::new());
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let reason = match running.answers.recv_timeout(left) {
                Ok(Ok(line)) => match serde_json::from_str::<Answer>(&line) {
                    Ok(Answer::Header { format, modality }) => {
                        decoded.format = format;
                        decoded.modality = modality;
                        continue;
                    }
                    Ok(Answer::Done { images }) => {
                        decoded.images = images;
                        self.child = Some(running);
                        return Ok(decoded);
                    }
                    Err(e) => {
                        kill(&mut running.child);
                        let why = finish(running, None);
                        format!(
                            "the decoder gave an answer that cannot be read ({e}; {why}); the file was skipped"
                        )
                    }
                },
                Err(RecvTimeoutError::Timeout) => {
                    kill(&mut running.child);
                    let why = finish(running, None);
                    tracing::warn!(file = %request.rel, "decoding timed out: {why}");
                    format!(
                        "decoding took longer than {} s (dataset.decoding.timeout_seconds); the file was skipped",
                        self.limits.timeout_seconds
                    )
                }
                Ok(Err(_)) | Err(RecvTimeoutError::Disconnected) => {
                    let why = finish(running, Some(self.limits));
                    tracing::warn!(file = %request.rel, "the decoder stopped on a file: {why}");
                    format!("the decoder stopped on this file ({why}); the file was skipped")
                }
            };
            decoded.images = Err(reason);
            return Ok(decoded);
        }
    }

    fn start(&self) -> Result<Running, DataError> {
        let fail = |reason: String| DataError::Decoder { reason };
        let mut child = Command::new(self.program)
            .arg(CHILD_FLAG)
            .arg(self.limits.max_memory_mib.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| {
                fail(format!(
                    "cannot start the decoder {}: {e}",
                    self.program.display()
                ))
            })?;
        let (Some(stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Err(fail("the decoder's standard streams are not open".into()));
        };
        let (send, answers) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let stop = line.is_err();
                if send.send(line).is_err() || stop {
                    break;
                }
            }
        });
        let tail = Arc::new(Mutex::new(VecDeque::new()));
        let keep = tail.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(mut t) = keep.lock() {
                    if t.len() == STDERR_LINES {
                        t.pop_front();
                    }
                    t.push_back(line);
                }
            }
        });
        let running = Running {
            child,
            stdin,
            answers,
            stderr: tail,
        };
        let hello = format!("{{\"decoder\":{PROTOCOL}}}");
        match running.answers.recv_timeout(Duration::from_secs(30)) {
            Ok(Ok(line)) if line == hello => Ok(running),
            other => {
                let said = match other {
                    Ok(Ok(line)) => format!("it said {:?}", truncate(&line)),
                    _ => "it said nothing".into(),
                };
                let mut running = running;
                kill(&mut running.child);
                let why = finish(running, None);
                Err(fail(format!(
                    "{} is not a Consilium decoder of this version ({said}; {why})",
                    self.program.display()
                )))
            }
        }
    }
}

impl Drop for Session<'_> {
    fn drop(&mut self) {
        if let Some(mut r) = self.child.take() {
            // Closing its input ends the child's loop; it exits on its own.
            drop(r.stdin);
            if let Err(e) = r.child.wait() {
                tracing::warn!(error = %e, "the decoder did not exit cleanly");
            }
        }
    }
}

/// Stops a child that is stuck or no longer to be trusted; one that has already ended is fine.
fn kill(child: &mut Child) {
    if let Err(e) = child.kill() {
        tracing::debug!(error = %e, "the decoder had already ended");
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(200).collect()
}

/// Waits for a stopped child and says how it ended, in words a site's IT can act on.
fn finish(mut running: Running, limits: Option<DecodeLimits>) -> String {
    drop(running.stdin);
    let status = running.child.wait();
    // Let the stderr reader take the last words.
    std::thread::sleep(Duration::from_millis(50));
    let last: Vec<String> = running
        .stderr
        .lock()
        .map(|t| t.iter().map(|l| truncate(l.trim())).collect())
        .unwrap_or_default();
    let said = last
        .iter()
        .rev()
        .find(|l| !l.is_empty() && !l.starts_with("note:"))
        .cloned();
    let out_of_memory = last.iter().any(|l| l.contains("memory allocation of"));
    let how = match status {
        Err(e) => format!("its end cannot be read: {e}"),
        Ok(s) => {
            use std::os::unix::process::ExitStatusExt;
            match (s.code(), s.signal()) {
                (_, Some(sig)) => format!("killed by signal {sig} ({})", signal_name(sig)),
                (Some(code), None) => format!("exit status {code}"),
                (None, None) => "ended".into(),
            }
        }
    };
    let mut out = match (out_of_memory, limits) {
        (true, Some(l)) => format!(
            "it needed more than {} MiB (dataset.decoding.max_memory_mib), {how}",
            l.max_memory_mib
        ),
        _ => how,
    };
    if let Some(said) = said {
        out.push_str(": ");
        out.push_str(&said);
    }
    out
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        4 => "illegal instruction",
        6 => "abort",
        7 => "bus error",
        8 => "arithmetic error",
        9 => "killed",
        11 => "segmentation fault",
        _ => "signal",
    }
}

/// In a program's `main`, before anything else: when started as a decoding child, serves
/// requests until its input closes and exits; otherwise returns at once.
pub fn serve_if_child() {
    let mut args = std::env::args();
    if args.nth(1).as_deref() != Some(CHILD_FLAG) {
        return;
    }
    let memory = args.next().and_then(|m| m.parse::<u64>().ok());
    std::process::exit(match serve(memory) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("decoder: {e}");
            1
        }
    })
}

fn serve(max_memory_mib: Option<u64>) -> std::io::Result<()> {
    // A crash leaves no core file with patient pixels in it.
    rlimit::Resource::CORE.set(0, 0)?;
    if let Some(mib) = max_memory_mib {
        let bytes = mib.saturating_mul(1024 * 1024);
        rlimit::Resource::AS.set(bytes, bytes)?;
    }
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    writeln!(out, "{{\"decoder\":{PROTOCOL}}}")?;
    out.flush()?;
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let mut header_failed = None;
        let images = match serde_json::from_str::<Request>(&line) {
            Ok(request) => {
                let mut header = |format: &str, modality: Option<&str>| {
                    let said = Answer::Header {
                        format: format.to_string(),
                        modality: modality.map(str::to_string),
                    };
                    if let Err(e) = say(&mut out, &said) {
                        header_failed = Some(e);
                    }
                };
                let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    data::decode_file(&request, &mut header)
                }));
                match decoded {
                    Ok(decoded) => decoded.images,
                    Err(panic) => {
                        let what = panic
                            .downcast_ref::<&str>()
                            .map(|s| (*s).to_string())
                            .or_else(|| panic.downcast_ref::<String>().cloned())
                            .unwrap_or_else(|| "no message".into());
                        Err(format!(
                            "the decoder failed on this file ({what}); the file was skipped"
                        ))
                    }
                }
            }
            Err(e) => Err(format!("a decoding request cannot be read: {e}")),
        };
        if let Some(e) = header_failed {
            return Err(e);
        }
        say(&mut out, &Answer::Done { images })?;
    }
    Ok(())
}

fn say(out: &mut impl Write, answer: &Answer) -> std::io::Result<()> {
    let text = serde_json::to_string(answer).map_err(std::io::Error::other)?;
    writeln!(out, "{text}")?;
    out.flush()
}
