//! Fused updates: [`DistAdamW`](super::DistAdamW) keeps the state of consecutive parameters
//! (their owned rows, flattened) concatenated in one flat tensor per **group**, so one AdamW
//! update — about sixteen tensor operations — serves a whole group instead of each parameter
//! (torch's multi-tensor `foreach` AdamW, Megatron's contiguous optimizer buffers). On a fusing
//! GPU backend a step then registers and launches a few operations per group rather than per
//! parameter (GPT-2 has 149 parameter tensors); the arithmetic is element-wise, so the values
//! are bitwise those of the per-parameter update.
//!
//! A group holds parameters of one dtype and one state (same step count, moments and master
//! present or not), in the order the step visits them, up to
//! [`group_bytes`](super::DistAdamWConfig::group_bytes) per flat f32 tensor (at least one
//! parameter; the group's moments and master are each that size). The grouping is planned at
//! each step from the parameters that have gradients; when it differs from the stored one (the
//! first step, after a checkpoint load, a parameter without a gradient) the state is regrouped
//! by concatenation, one stored group at a time. A parameter that missed a step keeps a lower
//! step count from then on, so it and its neighbours form separate groups (the values are the
//! same, only less is fused).

use std::collections::{HashMap, HashSet};

use burn::module::ParamId;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

/// The state of one parameter's owned rows (views of its group's flat tensors).
#[derive(Debug, Clone)]
pub(crate) struct Slot<I: Backend> {
    /// f32 copy of the owned rows (non-f32 parameters only).
    pub master: Option<Tensor<I, 1>>,
    /// First and second moments of the owned rows.
    pub moments: Option<(Tensor<I, 1>, Tensor<I, 1>)>,
    /// Steps taken.
    pub step: usize,
}

/// The state of consecutive parameters, concatenated in member order.
#[derive(Debug, Clone)]
pub(crate) struct Group<I: Backend> {
    /// Members and their owned elements, in order.
    pub members: Vec<(ParamId, usize)>,
    /// The members' state, flat (a member's state is its `len` elements at its offset).
    pub state: Slot<I>,
}

/// What decides whether two parameters can share a group (besides dtype and size).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Signature {
    step: usize,
    moments: bool,
    master: bool,
}

/// Every parameter's state, grouped.
#[derive(Debug)]
pub(crate) struct Groups<I: Backend> {
    groups: Vec<Group<I>>,
    /// Parameter → (group, element offset, owned elements).
    index: HashMap<ParamId, (usize, usize, usize)>,
}

impl<I: Backend> Default for Groups<I> {
    fn default() -> Self {
        Self { groups: Vec::new(), index: HashMap::new() }
    }
}

/// `pieces` as one flat tensor: the non-empty ones concatenated (no copy for one; an empty
/// piece stands for an all-empty list).
pub(crate) fn concat<I: Backend>(pieces: Vec<Tensor<I, 1>>) -> Tensor<I, 1> {
    let first = pieces.first().cloned().expect("concat of no pieces");
    let mut full: Vec<_> = pieces.into_iter().filter(|t| t.dims()[0] > 0).collect();
    match full.len() {
        0 => first,
        1 => full.remove(0),
        _ => Tensor::cat(full, 0),
    }
}

/// Elements `at..at + len` of `t` (the whole tensor when it is exactly that).
fn piece<I: Backend>(t: &Tensor<I, 1>, at: usize, len: usize) -> Tensor<I, 1> {
    if at == 0 && t.dims()[0] == len {
        t.clone()
    } else {
        t.clone().slice(at..at + len)
    }
}

/// `flat` cut into the members' pieces (`lens` in order).
pub(crate) fn split<I: Backend>(flat: Tensor<I, 1>, lens: &[usize]) -> Vec<Tensor<I, 1>> {
    let mut at = 0;
    lens.iter()
        .map(|&n| {
            let p = piece(&flat, at, n);
            at += n;
            p
        })
        .collect()
}

impl<I: Backend> Groups<I> {
    /// Parameters with state.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// One parameter's state as views of its group's tensors.
    pub fn slot(&self, id: &ParamId) -> Option<Slot<I>> {
        let &(g, at, len) = self.index.get(id)?;
        Some(cut(&self.groups[g].state, at, len))
    }

    /// The grouping key of a parameter's state (a parameter without state: step 0, nothing).
    pub fn signature(&self, id: &ParamId) -> Signature {
        match self.index.get(id) {
            Some(&(g, ..)) => {
                let s = &self.groups[g].state;
                Signature { step: s.step, moments: s.moments.is_some(), master: s.master.is_some() }
            }
            None => Signature { step: 0, moments: false, master: false },
        }
    }

    /// Replaces the state by one single-member group per `(id, len, slot)`.
    pub fn from_slots(slots: Vec<(ParamId, usize, Slot<I>)>) -> Self {
        let groups = slots.into_iter().map(|(id, len, state)| Group { members: vec![(id, len)], state }).collect();
        Self::indexed(groups)
    }

    fn indexed(groups: Vec<Group<I>>) -> Self {
        let mut index = HashMap::new();
        for (g, group) in groups.iter().enumerate() {
            let mut at = 0;
            for &(id, len) in &group.members {
                index.insert(id, (g, at, len));
                at += len;
            }
        }
        Self { groups, index }
    }

    /// Takes out the state of `runs` (each a planned group's members), regrouping where the
    /// stored groups differ: a run equal to a stored group takes it as it is, any other run
    /// concatenates its members' pieces (a stored group is dropped as soon as its last piece is
    /// copied: the regrouping holds one group's worth twice, not the whole state). Members of no
    /// run keep their state; where their group was broken up, as single-member groups copied
    /// out of it (a view would keep the whole group's tensors alive): their ids are returned
    /// too, so the step can copy their parameter values likewise.
    pub fn take(&mut self, runs: &[Vec<(ParamId, usize)>]) -> (Vec<Group<I>>, Vec<ParamId>) {
        let mut old: Vec<Option<Group<I>>> = std::mem::take(&mut self.groups).into_iter().map(Some).collect();
        let index = std::mem::take(&mut self.index);
        let same: Vec<Option<usize>> = {
            let whole: HashMap<&[(ParamId, usize)], usize> =
                old.iter().enumerate().map(|(g, x)| (x.as_ref().expect("all present").members.as_slice(), g)).collect();
            runs.iter().map(|r| whole.get(r.as_slice()).copied()).collect()
        };
        let in_runs: HashSet<ParamId> = runs.iter().flatten().map(|(id, _)| *id).collect();
        let whole: HashSet<usize> = same.iter().flatten().copied().collect();
        let (mut rest, mut left) = (Vec::new(), Vec::new());
        for (g, slot) in old.iter_mut().enumerate() {
            let Some(group) = slot.as_ref().filter(|_| !whole.contains(&g)) else { continue };
            if group.members.iter().all(|(id, _)| !in_runs.contains(id)) {
                rest.extend(slot.take());
                continue;
            }
            let mut at = 0;
            for &(id, len) in &group.members {
                if !in_runs.contains(&id) {
                    rest.push(Group { members: vec![(id, len)], state: copy(cut(&group.state, at, len)) });
                    left.push(id);
                }
                at += len;
            }
        }
        // Pieces still to be copied out of each stored group.
        let mut pending = vec![0usize; old.len()];
        let stored = |run: &[(ParamId, usize)]| run.iter().filter_map(|(id, _)| index.get(id).map(|x| x.0)).collect::<Vec<_>>();
        for (run, _) in runs.iter().zip(&same).filter(|(_, s)| s.is_none()) {
            for g in stored(run) {
                pending[g] += 1;
            }
        }
        let mut out = Vec::with_capacity(runs.len());
        for (run, same) in runs.iter().zip(same) {
            if let Some(g) = same {
                out.push(old[g].take().expect("a stored group serves one run"));
                continue;
            }
            out.push(assemble(run, &old, &index));
            for g in stored(run) {
                pending[g] -= 1;
                if pending[g] == 0 {
                    old[g] = None;
                }
            }
        }
        *self = Self::indexed(rest);
        (out, left)
    }
}

/// A run's group from its members' stored pieces (all of one signature by construction).
fn assemble<I: Backend>(run: &[(ParamId, usize)], old: &[Option<Group<I>>], index: &HashMap<ParamId, (usize, usize, usize)>) -> Group<I> {
    let slots: Vec<Option<Slot<I>>> = run
        .iter()
        .map(|(id, len)| {
            index.get(id).map(|&(g, at, n)| {
                assert_eq!(n, *len, "optimizer state of {id} has {n} elements, the parameter owns {len}");
                cut(&old[g].as_ref().expect("all present").state, at, n)
            })
        })
        .collect();
    let step = slots.first().and_then(|s| s.as_ref().map(|s| s.step)).unwrap_or(0);
    let (mut masters, mut ms, mut vs) = (Vec::new(), Vec::new(), Vec::new());
    for s in slots.into_iter().flatten() {
        masters.extend(s.master);
        if let Some((m, v)) = s.moments {
            ms.push(m);
            vs.push(v);
        }
    }
    let n = run.len();
    let full = |v: Vec<Tensor<I, 1>>| (v.len() == n).then(|| concat(v));
    let moments = full(ms).zip(full(vs));
    Group { members: run.to_vec(), state: Slot { master: full(masters), moments, step } }
}

impl<I: Backend> Groups<I> {
    /// Stores updated groups (after [`take`](Self::take)).
    pub fn put(&mut self, updated: Vec<Group<I>>) {
        let mut groups = std::mem::take(&mut self.groups);
        groups.extend(updated);
        *self = Self::indexed(groups);
    }
}

/// `t` in a buffer of its own (× 1: exact; a slice shares its whole source's buffer).
pub(crate) fn own_copy<I: Backend, const D: usize>(t: Tensor<I, D>) -> Tensor<I, D> {
    t.mul_scalar(1.0)
}

/// A member's state in buffers of its own.
fn copy<I: Backend>(s: Slot<I>) -> Slot<I> {
    Slot { master: s.master.map(own_copy), moments: s.moments.map(|(m, v)| (own_copy(m), own_copy(v))), step: s.step }
}

/// One member's state out of a group's.
fn cut<I: Backend>(s: &Slot<I>, at: usize, len: usize) -> Slot<I> {
    Slot {
        master: s.master.as_ref().map(|m| piece(m, at, len)),
        moments: s.moments.as_ref().map(|(m, v)| (piece(m, at, len), piece(v, at, len))),
        step: s.step,
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::Flex;

    use super::*;

    type I = Flex;

    fn slot(values: &[f32], step: usize) -> Slot<I> {
        let t = |k: f32| Tensor::<I, 1>::from_floats(values.iter().map(|v| v * k).collect::<Vec<_>>().as_slice(), &Default::default());
        Slot { master: Some(t(1.0)), moments: Some((t(10.0), t(100.0))), step }
    }

    fn values(s: &Slot<I>) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let v = |t: &Tensor<I, 1>| t.to_data().to_vec::<f32>().unwrap();
        let (m, s2) = s.moments.as_ref().unwrap();
        (v(s.master.as_ref().unwrap()), v(m), v(s2))
    }

    #[test]
    fn regrouping_keeps_every_parameters_state() {
        let ids: Vec<ParamId> = (0..4).map(|_| ParamId::new()).collect();
        let data: [&[f32]; 4] = [&[1.0, 2.0], &[3.0, 4.0, 5.0], &[6.0], &[7.0, 8.0]];
        let mut g = Groups::<I>::from_slots(ids.iter().zip(data).map(|(id, d)| (*id, d.len(), slot(d, 3))).collect());
        let m = |i: usize| (ids[i], data[i].len());
        // a + b + c concatenated, d untouched.
        let (taken, left) = g.take(&[vec![m(0), m(1), m(2)]]);
        assert!(left.is_empty(), "no stored group was broken up");
        assert_eq!(values(&taken[0].state).0, vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        assert_eq!(values(&taken[0].state).2, vec![100.0, 200.0, 300.0, 400.0, 500.0, 600.0]);
        assert_eq!(g.len(), 1, "d stays");
        g.put(taken);
        assert_eq!(g.len(), 4);
        assert_eq!(g.signature(&ids[1]), g.signature(&ids[3]));
        // The same group again comes back as it is; a different split cuts it.
        let (same, _) = g.take(&[vec![m(0), m(1), m(2)]]);
        assert_eq!(same[0].members, vec![m(0), m(1), m(2)]);
        g.put(same);
        let (taken, left) = g.take(&[vec![m(1), m(2), m(3)]]);
        assert_eq!(left, vec![ids[0]], "a is copied out of its broken group");
        assert_eq!(values(&taken[0].state).1, vec![30.0, 40.0, 50.0, 60.0, 70.0, 80.0]);
        assert_eq!(g.len(), 1, "a is left alone, out of its broken group");
        assert_eq!(values(&g.slot(&ids[0]).unwrap()), (vec![1.0, 2.0], vec![10.0, 20.0], vec![100.0, 200.0]));
        g.put(taken);
        for (i, d) in data.iter().enumerate() {
            assert_eq!(values(&g.slot(&ids[i]).unwrap()).0, d.to_vec(), "parameter {i}");
            assert_eq!(g.slot(&ids[i]).unwrap().step, 3);
        }
        // A parameter never seen has no state and groups with nothing that has.
        let new = ParamId::new();
        assert!(g.slot(&new).is_none());
        assert_ne!(g.signature(&new), g.signature(&ids[0]));
        let (fresh, left) = g.take(&[vec![(new, 2)]]);
        assert!(left.is_empty());
        assert!(fresh[0].state.moments.is_none() && fresh[0].state.master.is_none() && fresh[0].state.step == 0);
    }

    #[test]
    fn split_and_concat_are_inverse_with_empty_pieces() {
        let t = Tensor::<I, 1>::from_floats([1.0, 2.0, 3.0], &Default::default());
        let parts = split(t, &[0, 2, 0, 1]);
        assert_eq!(parts.iter().map(|p| p.dims()[0]).collect::<Vec<_>>(), vec![0, 2, 0, 1]);
        assert_eq!(concat(parts).to_data().to_vec::<f32>().unwrap(), vec![1.0, 2.0, 3.0]);
        let empty = split(Tensor::<I, 1>::from_floats([1.0], &Default::default()), &[0, 1]).remove(0);
        assert_eq!(concat(vec![empty.clone(), empty]).dims(), [0]);
    }
}
