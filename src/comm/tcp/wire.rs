//! Frames on the TCP connection between two ranks, and the inbox each rank's reader threads fill.
//!
//! A frame (little-endian): magic `BPTF`, kind `u8` (0 collective, 1 point-to-point, 2 abort), the group
//! label (`u16` length + UTF-8), a key `u64` (the group's collective sequence number, or the
//! point-to-point tag), the operation's name (`u16` length + UTF-8, so ranks calling different
//! collectives find out), then `u8` 0 (no tensor) or 1 followed by the dtype code `u8`, the rank
//! `u8`, the dimensions (`u64` each), the byte count `u64` (checked against shape × dtype) and the
//! bytes.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{Read, Write};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use burn::tensor::{DType, TensorData};

const MAGIC: &[u8; 4] = b"BPTF";
/// The dtypes a frame carries, by code (their index).
const DTYPES: [DType; 13] = [
    DType::F64,
    DType::F32,
    DType::Flex32,
    DType::F16,
    DType::BF16,
    DType::I64,
    DType::I32,
    DType::I16,
    DType::I8,
    DType::U64,
    DType::U32,
    DType::U16,
    DType::U8,
];

/// What a frame belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Kind {
    /// The `key`-th collective of a group.
    Collective = 0,
    /// A point-to-point message under tag `key`.
    P2p = 1,
    /// The sender failed (`op` holds its error) and waits for nobody any more: nobody waits for
    /// it either, and nobody completes the collective `key` of `group` it gave up on
    /// ([`NO_COLLECTIVE`]: none) with the frame it may have sent for it.
    Abort = 2,
}

/// An abort frame's key when the sender gave up on no collective.
pub(super) const NO_COLLECTIVE: u64 = u64::MAX;

/// Where a frame goes in the receiver's inbox: (sender's global rank, kind, group label, key).
pub(super) type Slot = (usize, Kind, String, u64);

/// One message.
#[derive(Debug)]
pub(super) struct Frame {
    pub kind: Kind,
    pub group: String,
    pub key: u64,
    pub op: String,
    pub data: Option<TensorData>,
}

fn dtype_code(dtype: DType) -> std::io::Result<u8> {
    let code = match dtype {
        DType::Bool(_) => return Err(std::io::Error::other("bool tensors are not sent (convert them to u8)")),
        d => DTYPES.iter().position(|x| *x == d),
    };
    code.map(|c| c as u8).ok_or_else(|| std::io::Error::other(format!("dtype {dtype:?} cannot be sent")))
}

/// Whether a frame can carry `d` (a dtype with a code, at most 255 dimensions).
pub(super) fn check_sendable(d: &TensorData) -> Result<(), String> {
    dtype_code(d.dtype).map_err(|e| e.to_string())?;
    if d.shape.len() > u8::MAX as usize {
        return Err(format!("a tensor of {} dimensions cannot be sent (at most 255)", d.shape.len()));
    }
    Ok(())
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    let mut end = s.len().min(u16::MAX as usize);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    let b = &s.as_bytes()[..end];
    out.extend_from_slice(&(b.len() as u16).to_le_bytes());
    out.extend_from_slice(b);
}

/// A frame's header fields (the tensor travels by reference: it is not copied to be sent).
#[derive(Debug, Clone, Copy)]
pub(super) struct Head<'a> {
    pub kind: Kind,
    pub group: &'a str,
    pub key: u64,
    pub op: &'a str,
}

/// Writes one frame (the tensor's bytes straight from the tensor).
pub(super) fn write_frame(w: &mut impl Write, h: Head<'_>, data: Option<&TensorData>) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(64 + h.group.len() + h.op.len());
    head.extend_from_slice(MAGIC);
    head.push(h.kind as u8);
    put_str(&mut head, h.group);
    head.extend_from_slice(&h.key.to_le_bytes());
    put_str(&mut head, h.op);
    match data {
        None => head.push(0),
        Some(d) => {
            head.push(1);
            head.push(dtype_code(d.dtype)?);
            head.push(u8::try_from(d.shape.len()).map_err(|_| std::io::Error::other("more than 255 dimensions"))?);
            for &n in d.shape.iter() {
                head.extend_from_slice(&(n as u64).to_le_bytes());
            }
            head.extend_from_slice(&(d.as_bytes().len() as u64).to_le_bytes());
        }
    }
    w.write_all(&head)?;
    if let Some(d) = data {
        w.write_all(d.as_bytes())?;
    }
    Ok(())
}

fn bad(why: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, why)
}

fn word<const N: usize>(r: &mut impl Read) -> std::io::Result<[u8; N]> {
    let mut b = [0u8; N];
    r.read_exact(&mut b)?;
    Ok(b)
}

fn get_str(r: &mut impl Read) -> std::io::Result<String> {
    let len = u16::from_le_bytes(word(r)?) as usize;
    let mut b = vec![0u8; len];
    r.read_exact(&mut b)?;
    String::from_utf8(b).map_err(|_| bad("a name that is not UTF-8".into()))
}

/// Reads the next frame; `None` at a clean end of the stream (between frames).
pub(super) fn read_frame(r: &mut impl Read) -> std::io::Result<Option<Frame>> {
    let mut magic = [0u8; 4];
    loop {
        match r.read(&mut magic[..1]) {
            Ok(0) => return Ok(None),
            Ok(_) => break,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    r.read_exact(&mut magic[1..])?;
    if &magic != MAGIC {
        return Err(bad(format!("bad frame magic {magic:?}")));
    }
    let kind = match word::<1>(r)?[0] {
        0 => Kind::Collective,
        1 => Kind::P2p,
        2 => Kind::Abort,
        k => return Err(bad(format!("unknown frame kind {k}"))),
    };
    let group = get_str(r)?;
    let key = u64::from_le_bytes(word(r)?);
    let op = get_str(r)?;
    let data = match word::<1>(r)?[0] {
        0 => None,
        _ => Some(read_tensor(r)?),
    };
    Ok(Some(Frame { kind, group, key, op, data }))
}

fn read_tensor(r: &mut impl Read) -> std::io::Result<TensorData> {
    let [code, rank] = word::<2>(r)?;
    let dtype = *DTYPES.get(code as usize).ok_or_else(|| bad(format!("unknown dtype code {code}")))?;
    let shape = (0..rank).map(|_| word(r).map(|w| u64::from_le_bytes(w) as usize)).collect::<std::io::Result<Vec<_>>>()?;
    let len = u64::from_le_bytes(word(r)?) as usize;
    let expect = shape.iter().try_fold(dtype.size(), |a, &n| a.checked_mul(n));
    if expect != Some(len) {
        return Err(bad(format!("a {shape:?} {dtype:?} tensor announced {len} bytes")));
    }
    let mut bytes = vec![0u8; len];
    r.read_exact(&mut bytes)?;
    Ok(TensorData::from_bytes_vec(bytes, shape, dtype))
}

/// Frames received and not yet taken, by slot, and the peers whose connection ended (why).
#[derive(Debug, Default)]
pub(super) struct InboxState {
    queues: HashMap<Slot, VecDeque<Frame>>,
    gone: HashMap<usize, String>,
    /// Collectives a sender gave up on (its abort): never completed with its frame.
    abandoned: HashSet<Slot>,
}

/// What the reader threads fill and the communicators wait on.
#[derive(Debug, Default)]
pub(super) struct Inbox {
    state: Mutex<InboxState>,
    cv: Condvar,
}

/// Why waiting for frames failed.
pub(super) enum WaitError {
    /// Past the deadline: the senders whose frames are missing.
    Timeout(Vec<usize>),
    /// A missing frame's sender can no longer send (its connection ended): who and why.
    Gone(usize, String),
    /// A sender gave up on this collective (who and why), and the operations of the frames that
    /// are there (sender, name): a mismatch among them is the better error.
    Abandoned(usize, String, Vec<(usize, String)>),
}

impl Inbox {
    fn lock(&self) -> MutexGuard<'_, InboxState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Files a frame from global rank `src`.
    pub fn push(&self, src: usize, f: Frame) {
        let slot = (src, f.kind, f.group.clone(), f.key);
        self.lock().queues.entry(slot).or_default().push_back(f);
        self.cv.notify_all();
    }

    /// Records that `src`'s connection ended.
    pub fn mark_gone(&self, src: usize, why: String) {
        self.lock().gone.entry(src).or_insert(why);
        self.cv.notify_all();
    }

    /// Records that `src` failed (`why`) and gave up on collective `key` of `group` (unless
    /// [`NO_COLLECTIVE`]).
    pub fn mark_aborted(&self, src: usize, group: String, key: u64, why: String) {
        let mut st = self.lock();
        if key != NO_COLLECTIVE {
            st.abandoned.insert((src, Kind::Collective, group, key));
        }
        st.gone.entry(src).or_insert(why);
        drop(st);
        self.cv.notify_all();
    }

    /// Why `src` is gone, waiting up to `wait` for its reader to find out (a write to it failed:
    /// the reason its reader sees, e.g. its abort message, names the cause).
    pub fn gone_reason(&self, src: usize, wait: Duration) -> Option<String> {
        let start = Instant::now();
        let mut st = self.lock();
        loop {
            if let Some(why) = st.gone.get(&src) {
                return Some(why.clone());
            }
            let waited = start.elapsed();
            if waited >= wait {
                return None;
            }
            st = self.cv.wait_timeout(st, wait - waited).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// Takes one frame per slot (in order; a slot listed twice takes its next two frames) once
    /// all are there. Frames already received are taken even from a peer that is gone since.
    pub fn take(&self, slots: &[Slot], timeout: Duration) -> Result<Vec<Frame>, WaitError> {
        let start = Instant::now();
        let mut st = self.lock();
        loop {
            if let Some(s) = slots.iter().find(|s| st.abandoned.contains(*s)) {
                let why = st.gone.get(&s.0).cloned().unwrap_or_default();
                let ops = slots.iter().filter_map(|s| st.queues.get(s).and_then(VecDeque::front).map(|f| (s.0, f.op.clone()))).collect();
                return Err(WaitError::Abandoned(s.0, format!("it abandoned this collective: {why}"), ops));
            }
            let missing: Vec<&Slot> = slots
                .iter()
                .enumerate()
                .filter(|(i, s)| {
                    let need = slots[..=*i].iter().filter(|x| x == s).count();
                    st.queues.get(*s).map_or(0, VecDeque::len) < need
                })
                .map(|(_, s)| s)
                .collect();
            if missing.is_empty() {
                let frames = slots.iter().map(|s| st.queues.get_mut(s).and_then(VecDeque::pop_front).expect("counted")).collect();
                st.queues.retain(|_, q| !q.is_empty());
                return Ok(frames);
            }
            if let Some((src, why)) = missing.iter().find_map(|s| st.gone.get(&s.0).map(|w| (s.0, w.clone()))) {
                return Err(WaitError::Gone(src, why));
            }
            let waited = start.elapsed();
            if waited >= timeout {
                let mut who: Vec<usize> = missing.iter().map(|s| s.0).collect();
                who.dedup();
                return Err(WaitError::Timeout(who));
            }
            st = self.cv.wait_timeout(st, (timeout - waited).min(Duration::from_millis(200))).unwrap_or_else(|e| e.into_inner()).0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_roundtrip_and_garbage_is_refused() {
        let data = TensorData::new(vec![1.5f32, -2.0, 3.25, 0.0, 7.0, 8.0], [2, 3]).convert_dtype(DType::BF16);
        let h = Head { kind: Kind::P2p, group: "pp[0,2]", key: 42, op: "send" };
        let mut buf = Vec::new();
        write_frame(&mut buf, h, Some(&data)).unwrap();
        write_frame(&mut buf, Head { kind: Kind::Collective, group: "w", key: 7, op: "barrier" }, None).unwrap();
        let mut r = buf.as_slice();
        let got = read_frame(&mut r).unwrap().unwrap();
        assert_eq!((got.kind, got.group.as_str(), got.key, got.op.as_str()), (Kind::P2p, "pp[0,2]", 42, "send"));
        let d = got.data.unwrap();
        assert_eq!((d.shape.to_vec(), d.dtype, d.as_bytes()), (vec![2, 3], DType::BF16, data.as_bytes()));
        assert!(read_frame(&mut r).unwrap().unwrap().data.is_none());
        assert!(read_frame(&mut r).unwrap().is_none(), "a clean end between frames");
        assert!(read_frame(&mut &b"XXXX"[..]).unwrap_err().to_string().contains("magic"));
        // A truncated frame is an error, not an end.
        assert!(read_frame(&mut &buf[..20]).is_err());
        // A byte count that disagrees with the shape.
        let mut lie = Vec::new();
        write_frame(&mut lie, h, Some(&data)).unwrap();
        let at = lie.len() - data.as_bytes().len() - 8;
        lie[at] = 99;
        assert!(read_frame(&mut lie.as_slice()).unwrap_err().to_string().contains("announced 99 bytes"));
    }
}
