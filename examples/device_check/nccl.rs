//! NCCL with world size 1 against the local backend, on host data and on CUDA tensors.

use std::sync::Arc;
use std::time::Duration;

use burn::backend::{Autodiff, Cuda};
use burn::tensor::{DType, Tensor, TensorData};
use burn_parallel::comm::ops;
use burn_parallel::{CollectiveBackend, Comm, CommError, LocalWorld, NcclComm, NcclId, NcclOptions, RecvOp, ReduceOp, SendOp, TensorSpec};

use crate::kernels::K;
use crate::Report;

pub fn world1() -> Result<Comm, CommError> {
    let id = NcclId::new()?;
    let options = NcclOptions { device: 0, timeout: Duration::from_secs(60) };
    Ok(Arc::new(NcclComm::init(&id, 0, vec![0], "world[0]".into(), options)?))
}

fn data(dtype: DType) -> TensorData {
    let v: Vec<f32> = (0..24).map(|i| i as f32 * 0.5 - 3.0).collect();
    let t = Tensor::<burn::backend::Flex, 1>::from_data(TensorData::new(v, [24]), &Default::default()).cast(dtype);
    let d = t.into_data();
    TensorData::from_bytes_vec(d.as_bytes().to_vec(), [2, 3, 4], dtype)
}

fn same(a: &TensorData, b: &TensorData) -> Result<String, String> {
    if a.shape != b.shape || a.dtype != b.dtype || a.as_bytes() != b.as_bytes() {
        return Err(format!("{:?} {:?} vs {:?} {:?}", a.shape.as_slice(), a.dtype, b.shape.as_slice(), b.dtype));
    }
    Ok(String::new())
}

/// Every host-data collective on NCCL equals the local backend's result.
fn host_checks(report: &mut Report, nccl: &Comm, local: &Comm) {
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let d = data(dtype);
        let both = |f: &dyn Fn(&Comm) -> Result<TensorData, CommError>| -> Result<String, String> {
            let a = f(nccl).map_err(|e| e.to_string())?;
            let b = f(local).map_err(|e| e.to_string())?;
            same(&a, &b)
        };
        for op in [ReduceOp::Sum, ReduceOp::Max, ReduceOp::Mean] {
            report.check(&format!("nccl host all_reduce {op:?} {dtype:?}"), both(&|c| c.all_reduce(d.clone(), op)));
        }
        for dim in [0, 2] {
            report.check(&format!("nccl host all_gather dim {dim} {dtype:?}"), both(&|c| c.all_gather(d.clone(), dim)));
            report.check(&format!("nccl host reduce_scatter dim {dim} {dtype:?}"), both(&|c| c.reduce_scatter(d.clone(), dim, ReduceOp::Sum)));
        }
        report.check(&format!("nccl host broadcast {dtype:?}"), both(&|c| c.broadcast(Some(d.clone()), 0)));
        let p2p = |c: &Comm| {
            let spec = TensorSpec { shape: vec![2, 3, 4], dtype };
            let mut got = c.batch_p2p(vec![SendOp { data: d.clone(), peer: 0, tag: 9 }], &[RecvOp { peer: 0, tag: 9, spec }])?;
            Ok(got.remove(0))
        };
        report.check(&format!("nccl host send/recv to self {dtype:?}"), both(&p2p));
    }
    report.check("nccl barrier", nccl.barrier().map(|_| String::new()).map_err(|e| e.to_string()));
    let sub = nccl.new_group("sub", &[0]).and_then(|g| g.all_reduce(data(DType::F32), ReduceOp::Sum));
    report.check("nccl new_group + all_reduce", sub.map_err(|e| e.to_string()).and_then(|t| same(&t, &data(DType::F32))));
    // A receive expecting another shape: clear error, and the communicator still works after.
    let wrong = TensorSpec { shape: vec![4, 6], dtype: DType::F32 };
    let r = nccl.batch_p2p(vec![SendOp { data: data(DType::F32), peer: 0, tag: 1 }], &[RecvOp { peer: 0, tag: 1, spec: wrong }]);
    let after = nccl.all_reduce(data(DType::F32), ReduceOp::Sum);
    let res = match (r, after) {
        (Err(e @ CommError::P2pMismatch { .. }), Ok(_)) => Ok(format!("({e})")),
        (r, a) => Err(format!("expected a p2p mismatch then a working comm, got {r:?} / {:?}", a.map(|_| ()))),
    };
    report.check("nccl p2p mismatch is an error, comm survives", res);
}

fn tensor<B: burn::tensor::backend::Backend>(d: &TensorData) -> Tensor<B, 3> {
    Tensor::from_data(d.clone().convert::<f32>(), &Default::default())
}

/// Device-pointer collectives on CUDA tensors (`CubeBackend` and `Fusion`), world 1.
fn device_checks<B: CollectiveBackend>(report: &mut Report, nccl: &Comm, name: &str) {
    let counts = || nccl.as_any().downcast_ref::<NcclComm>().map_or((0, 0), |c| (c.ops_issued(), c.host_calls()));
    let before = counts();
    let d = data(DType::F32);
    let x = tensor::<B>(&d);
    let ok = |r: Result<Tensor<B, 3>, CommError>| r.map_err(|e| e.to_string()).and_then(|t| same(&t.into_data(), &d));
    for op in [ReduceOp::Sum, ReduceOp::Max, ReduceOp::Mean] {
        report.check(&format!("nccl {name} all_reduce {op:?}"), ok(ops::all_reduce(x.clone(), op, nccl)));
    }
    for dim in 0..3 {
        report.check(&format!("nccl {name} all_gather dim {dim}"), ok(ops::all_gather(x.clone(), dim, nccl)));
        report.check(&format!("nccl {name} reduce_scatter dim {dim}"), ok(ops::reduce_scatter(x.clone(), dim, ReduceOp::Sum, nccl)));
    }
    report.check(&format!("nccl {name} broadcast"), ok(ops::broadcast(x.clone(), 0, nccl)));
    let dev = Default::default();
    let got = ops::batch_p2p(vec![(x.clone(), 0, 4)], &[(0, 4, [2, 3, 4])], &dev, nccl).map(|mut v| v.remove(0));
    report.check(&format!("nccl {name} send/recv to self"), ok(got));
    let bad = ops::batch_p2p(vec![(x.clone(), 0, 4)], &[(0, 5, [2, 3, 4])], &dev, nccl);
    let res = match bad {
        Err(e @ CommError::Mismatch { .. }) => Ok(format!("({e})")),
        other => Err(format!("expected a tag mismatch, got {:?}", other.map(|_| ()))),
    };
    report.check(&format!("nccl {name} tag mismatch is an error"), res);
    // 3 all-reduces + 3 gathers + 3 scatters + broadcast + 2 p2p groups: 12 NCCL calls, and no
    // host-data call (which would mean the tensors were staged through the host).
    let after = counts();
    let (n, host) = (after.0 - before.0, after.1 - before.1);
    let r = if n == 12 && host == 0 { Ok(String::new()) } else { Err(format!("expected 12 NCCL calls and 0 host-staged calls, saw {n} and {host}")) };
    report.check(&format!("nccl {name} took the device-pointer path"), r);
}

/// An all-reduce of a tensor nobody else holds runs in place (the result is the input's
/// buffer); of a shared one, into a new buffer (the input stays readable).
fn in_place_checks(report: &mut Report, nccl: &Comm) {
    let d = data(DType::F32);
    let ptr = |t: &Tensor<K, 3>| -> Result<u64, String> {
        let p = t.clone().into_primitive().tensor();
        let r = p.client.get_resource(p.handle.clone()).map_err(|e| format!("{e:?}"))?;
        Ok(r.resource().ptr)
    };
    let run = |shared: bool| -> Result<String, String> {
        let x = tensor::<K>(&d);
        let (before, keep) = (ptr(&x)?, shared.then(|| x.clone()));
        let y = ops::all_reduce(x, ReduceOp::Sum, nccl).map_err(|e| e.to_string())?;
        let after = ptr(&y)?;
        same(&y.into_data(), &d)?;
        match (shared, before == after) {
            (false, true) => Ok("(same buffer)".into()),
            (true, false) => same(&keep.expect("kept").into_data(), &d).map(|_| "(new buffer, input intact)".into()),
            (false, false) => Err("a uniquely owned tensor was reduced into a new buffer".into()),
            (true, true) => Err("a shared tensor was reduced in place".into()),
        }
    };
    report.check("nccl all_reduce of a uniquely owned tensor runs in place", run(false));
    report.check("nccl all_reduce of a shared tensor does not", run(true));
}

/// The mappings' autodiff ops through NCCL (called directly: with one rank the public mappings
/// skip communication).
fn mapping_checks(report: &mut Report, nccl: &Comm) {
    type A = Autodiff<Cuda>;
    let d = data(DType::F32);
    let x = tensor::<A>(&d).require_grad();
    let p = x.clone().into_primitive().tensor();
    let y = A::map_reduce_scatter(A::map_gather_sp(A::map_reduce_from_tp(A::map_copy_to_tp(p, nccl), nccl), 1, nccl), 1, nccl);
    let y = Tensor::<A, 3>::from_primitive(burn::tensor::TensorPrimitive::Float(y));
    let grads = (y.clone() * 3.0).sum().backward();
    let gx = x.grad(&grads).map(|g| g.into_data());
    let want = Tensor::<burn::backend::Flex, 3>::ones([2, 3, 4], &Default::default()).mul_scalar(3.0).into_data();
    let r = match gx {
        Some(g) => same(&y.into_data(), &d).and_then(|_| same(&g, &want)),
        None => Err("no gradient".into()),
    };
    report.check("nccl mappings on Autodiff<Cuda> (forward + gradient)", r);
}

pub fn run(report: &mut Report) {
    match burn_parallel::cuda::nccl_version() {
        Ok(v) => println!("NCCL version {v}"),
        Err(e) => return report.check("nccl load", Err(e.to_string())),
    }
    let nccl = match world1() {
        Ok(c) => c,
        Err(e) => return report.check("nccl init (world 1)", Err(e.to_string())),
    };
    let local = LocalWorld::new(1).communicator(0);
    host_checks(report, &nccl, &local);
    device_checks::<K>(report, &nccl, "CubeBackend<Cuda>");
    device_checks::<Cuda>(report, &nccl, "Cuda (Fusion)");
    in_place_checks(report, &nccl);
    mapping_checks(report, &nccl);
}
