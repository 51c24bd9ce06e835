//! Under `Fusion` (burn's default `Wgpu` and `Cuda`) the layer-norm and RMS-norm kernels are
//! lazy custom operations of the fusion stream: registered with their inputs and outputs (no
//! flush of the stream, no wait), run on the inner backend's tensors when the stream executes.

use std::marker::PhantomData;

use burn::tensor::{DType, Shape};
use burn_fusion::stream::{Operation, OperationStreams};
use burn_fusion::{Fusion, FusionBackend, FusionRuntime, FusionTensor};
use burn_ir::{CustomOpIr, HandleContainer, OperationIr, TensorIr};

use super::super::{LayerNormBackend, LnBackward, LnForward, RmsPair};

impl<B: FusionBackend + LayerNormBackend> LayerNormBackend for Fusion<B> {
    fn layer_norm_rows(
        x: FusionTensor<B::FusionRuntime>,
        gamma: FusionTensor<B::FusionRuntime>,
        beta: FusionTensor<B::FusionRuntime>,
        epsilon: f32,
    ) -> LnForward<Self> {
        let n = x.shape[0];
        let outputs = [(x.shape.clone(), x.dtype), (Shape::new([n, 1]), DType::F32), (Shape::new([n, 1]), DType::F32)];
        let [y, mean, rstd] = NormFusionOp::<B>::register([x, gamma, beta], outputs, Kind::LayerNorm(epsilon));
        (y, mean, rstd)
    }

    fn layer_norm_rows_backward(
        dy: FusionTensor<B::FusionRuntime>,
        x: FusionTensor<B::FusionRuntime>,
        gamma: FusionTensor<B::FusionRuntime>,
        mean: FusionTensor<B::FusionRuntime>,
        rstd: FusionTensor<B::FusionRuntime>,
    ) -> LnBackward<Self> {
        let (h, dtype) = (gamma.shape.clone(), gamma.dtype);
        let outputs = [(x.shape.clone(), x.dtype), (h.clone(), dtype), (h, dtype)];
        let [dx, dg, db] = NormFusionOp::<B>::register([dy, x, gamma, mean, rstd], outputs, Kind::LayerNormBackward);
        (dx, dg, db)
    }

    fn rms_norm_fused(h: usize, dtype: DType, device: &B::Device) -> bool {
        B::rms_norm_fused(h, dtype, device)
    }

    fn rms_norm_rows(x: FusionTensor<B::FusionRuntime>, gamma: FusionTensor<B::FusionRuntime>, epsilon: f32) -> RmsPair<Self> {
        let n = x.shape[0];
        // r is f32 (f64 for f64 rows, which only the composed fallback takes).
        let stat = if x.dtype == DType::F64 { DType::F64 } else { DType::F32 };
        let outputs = [(x.shape.clone(), x.dtype), (Shape::new([n, 1]), stat)];
        let [y, rstd] = NormFusionOp::<B>::register([x, gamma], outputs, Kind::RmsNorm(epsilon));
        (y, rstd)
    }

    fn rms_norm_rows_backward(
        dy: FusionTensor<B::FusionRuntime>,
        x: FusionTensor<B::FusionRuntime>,
        gamma: FusionTensor<B::FusionRuntime>,
        rstd: FusionTensor<B::FusionRuntime>,
    ) -> RmsPair<Self> {
        let outputs = [(x.shape.clone(), x.dtype), (gamma.shape.clone(), gamma.dtype)];
        let [dx, dg] = NormFusionOp::<B>::register([dy, x, gamma, rstd], outputs, Kind::RmsNormBackward);
        (dx, dg)
    }
}

/// Which operation (with its ε where a forward).
#[derive(Debug, Clone, Copy)]
enum Kind {
    /// Inputs `x, γ, β`; outputs `y, μ, r`.
    LayerNorm(f32),
    /// Inputs `dy, x, γ, μ, r`; outputs `dx, dγ, dβ`.
    LayerNormBackward,
    /// Inputs `x, γ`; outputs `y, r`.
    RmsNorm(f32),
    /// Inputs `dy, x, γ, r`; outputs `dx, dγ`.
    RmsNormBackward,
}

/// A norm kernel as a fusion-stream operation.
#[derive(Debug)]
struct NormFusionOp<B> {
    desc: CustomOpIr,
    kind: Kind,
    _b: PhantomData<B>,
}

impl<B: FusionBackend + LayerNormBackend> NormFusionOp<B> {
    /// Registers the operation on the inputs' stream; returns its outputs (shape, dtype each).
    fn register<const N: usize, const M: usize>(
        inputs: [FusionTensor<B::FusionRuntime>; N],
        outputs: [(Shape, DType); M],
        kind: Kind,
    ) -> [FusionTensor<B::FusionRuntime>; M] {
        let client = inputs[0].client.clone();
        let streams = OperationStreams::with_inputs(&inputs);
        let outputs = outputs.map(|(shape, dtype)| TensorIr::uninit(client.create_empty_handle(), shape, dtype));
        let name = match kind {
            Kind::LayerNorm(_) => "burn-parallel-layer-norm",
            Kind::LayerNormBackward => "burn-parallel-layer-norm-backward",
            Kind::RmsNorm(_) => "burn-parallel-rms-norm",
            Kind::RmsNormBackward => "burn-parallel-rms-norm-backward",
        };
        let desc = CustomOpIr::new(name, &inputs.map(|t| t.into_ir()), &outputs);
        let op = Self { desc: desc.clone(), kind, _b: PhantomData };
        client.register(streams, OperationIr::Custom(desc), op).try_into().expect("as many outputs as declared")
    }
}

impl<B: FusionBackend + LayerNormBackend> Operation<B::FusionRuntime> for NormFusionOp<B> {
    fn execute(&self, handles: &mut HandleContainer<<B::FusionRuntime as FusionRuntime>::FusionHandle>) {
        let mut inputs = self.desc.inputs.iter().map(|t| handles.get_float_tensor::<B>(t)).collect::<Vec<_>>().into_iter();
        let mut next = || inputs.next().expect("as registered");
        let results = match self.kind {
            Kind::LayerNorm(epsilon) => {
                let (a, b, c) = B::layer_norm_rows(next(), next(), next(), epsilon);
                vec![a, b, c]
            }
            Kind::LayerNormBackward => {
                let (a, b, c) = B::layer_norm_rows_backward(next(), next(), next(), next(), next());
                vec![a, b, c]
            }
            Kind::RmsNorm(epsilon) => {
                let (a, b) = B::rms_norm_rows(next(), next(), epsilon);
                vec![a, b]
            }
            Kind::RmsNormBackward => {
                let (a, b) = B::rms_norm_rows_backward(next(), next(), next(), next());
                vec![a, b]
            }
        };
        for (ir, tensor) in self.desc.outputs.iter().zip(results) {
            handles.register_float_tensor::<B>(&ir.id, tensor);
        }
    }
}
