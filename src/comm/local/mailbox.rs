//! Receiving from the mailboxes: a batch's receives posted together (as NCCL posts a group's),
//! each letter checked against what its receive expects.

use burn::tensor::TensorData;

use super::{Letter, LocalComm, P2pMode};
use crate::comm::{Communicator, RecvOp};
use crate::error::CommError;

impl LocalComm {
    /// Waits for the letters `recvs` ask for, posted together as NCCL posts a group's receives:
    /// each takes its sender's next letter as soon as it is there (in order per sender only, so a
    /// slow sender listed first does not hold up the others); then checks each.
    pub(super) fn take_all(&self, recvs: &[RecvOp]) -> Result<Vec<TensorData>, CommError> {
        let me = self.global_rank();
        let srcs = recvs.iter().map(|r| self.peer_global(r.peer, "recv")).collect::<Result<Vec<_>, _>>()?;
        let keys: Vec<_> = recvs.iter().zip(&srcs).map(|(r, &src)| self.mailbox(src, me, r.tag)).collect();
        let rendezvous = self.world.p2p == P2pMode::Rendezvous;
        let mut letters: Vec<Option<Letter>> = recvs.iter().map(|_| None).collect();
        while let Some(first) = letters.iter().position(Option::is_none) {
            self.wait_mail(&recv_name(srcs[first], &recvs[first]), srcs[first], |mail| {
                let mut progress = false;
                for i in 0..keys.len() {
                    if letters[i].is_some() || (0..i).any(|j| letters[j].is_none() && keys[j] == keys[i]) {
                        continue;
                    }
                    if let Some(letter) = mail.boxes.get_mut(&keys[i]).and_then(|q| q.pop_front()) {
                        if rendezvous {
                            mail.taken.insert(letter.id);
                        }
                        letters[i] = Some(letter);
                        progress = true;
                    }
                }
                progress.then_some(())
            })?;
            self.world.mail_cv.notify_all();
        }
        recvs.iter().zip(srcs).zip(letters).map(|((r, src), letter)| self.check_letter(r, src, letter.expect("taken"))).collect()
    }

    /// The letter's data if it is what `r` (from `src`) expects.
    fn check_letter(&self, r: &RecvOp, src: usize, letter: Letter) -> Result<TensorData, CommError> {
        let me = self.global_rank();
        let op = recv_name(src, r);
        if letter.tag != r.tag {
            return Err(CommError::Mismatch {
                group: self.group.label.clone(),
                rank: me,
                op,
                other_rank: src,
                other_op: format!("send(tag={}) (point-to-point matches in order under NCCL)", letter.tag),
            });
        }
        let data = letter.data;
        if data.shape.as_slice() != r.spec.shape.as_slice() || data.dtype != r.spec.dtype {
            return Err(CommError::P2pMismatch {
                sender: src,
                receiver: me,
                sent_shape: data.shape.to_vec(),
                sent_dtype: format!("{:?}", data.dtype),
                expected_shape: r.spec.shape.clone(),
                expected_dtype: format!("{:?}", r.spec.dtype),
            });
        }
        Ok(data)
    }
}

/// How a receive is named in errors.
fn recv_name(src: usize, r: &RecvOp) -> String {
    format!("recv(from={src}, tag={}, {:?} {:?})", r.tag, r.spec.shape, r.spec.dtype)
}
