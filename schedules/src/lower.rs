//! Lowering: adds the sends and receives a computation order implies.
//!
//! A forward of stage `s > 0` whose predecessor lives on another rank is preceded by
//! `RECV_F(s)`; a forward of a non-last stage is followed by `SEND_F(s)` when the successor is on
//! another rank. Backwards (`B` or `I`) likewise receive the output gradient before and send the
//! input gradient after. Because every receive sits right before the action that needs it and every
//! send right after the action that produces it, the communication order on each rank follows its
//! computation order, and matching pairs are found by `(kind, stage, micro-batch)`.

use crate::action::{Action, Op, PipelineShape, Plan};

/// The plan of `order` with communication inserted.
pub fn lower(shape: &PipelineShape, order: Vec<Vec<Action>>) -> Plan {
    let last = shape.stages() - 1;
    let remote = |a: usize, b: usize| shape.rank_of(a) != shape.rank_of(b);
    let ranks = order
        .into_iter()
        .map(|actions| {
            let mut out = Vec::with_capacity(actions.len() * 3);
            for a in actions {
                let (s, mb) = (a.stage, a.mb);
                match a.op {
                    Op::F => {
                        if s > 0 && remote(s, s - 1) {
                            out.push(Action::new(Op::RecvF, s, mb));
                        }
                        out.push(a);
                        if s < last && remote(s, s + 1) {
                            out.push(Action::new(Op::SendF, s, mb));
                        }
                    }
                    Op::B | Op::I => {
                        if s < last && remote(s, s + 1) {
                            out.push(Action::new(Op::RecvB, s, mb));
                        }
                        out.push(a);
                        if s > 0 && remote(s, s - 1) {
                            out.push(Action::new(Op::SendB, s, mb));
                        }
                    }
                    _ => out.push(a),
                }
            }
            out
        })
        .collect();
    Plan { shape: *shape, ranks }
}
