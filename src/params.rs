//! Parameters by path: values and gradients of any Burn module, for parity checks, gradient
//! synchronisation and logging.

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData};

/// A parameter's path (`blocks.0.attn.qkv.weight`), value and gradient (if any).
#[derive(Debug, Clone)]
pub struct NamedParam {
    /// Dotted path.
    pub path: String,
    /// Current value.
    pub value: TensorData,
    /// Gradient, when collected from an autodiff module and present.
    pub grad: Option<TensorData>,
}

fn join(path: &[String]) -> String {
    path.join(".")
}

macro_rules! impl_visit {
    ($self:ident, $param:ident, $grad:expr) => {{
        let path = join(&$self.path);
        let value = $param.val().into_data();
        $self.out.push(NamedParam { path, value, grad: $grad });
    }};
}

struct ValueVisitor {
    path: Vec<String>,
    out: Vec<NamedParam>,
}

impl<B: Backend> ModuleVisitor<B> for ValueVisitor {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        impl_visit!(self, param, None)
    }
}

struct GradVisitor<'a, B: AutodiffBackend> {
    path: Vec<String>,
    out: Vec<NamedParam>,
    grads: &'a B::Gradients,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for GradVisitor<'_, B> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let grad = param.val().grad(self.grads).map(|g| g.into_data());
        impl_visit!(self, param, grad)
    }
}

/// Every float parameter of `module` with its path and value, in visiting order.
pub fn named_params<B: Backend, M: Module<B>>(module: &M) -> Vec<NamedParam> {
    let mut v = ValueVisitor { path: Vec::new(), out: Vec::new() };
    module.visit(&mut v);
    v.out
}

/// Every float parameter of `module` with its path, value and gradient from `grads`.
pub fn named_grads<B: AutodiffBackend, M: Module<B>>(module: &M, grads: &B::Gradients) -> Vec<NamedParam> {
    let mut v = GradVisitor { path: Vec::new(), out: Vec::new(), grads };
    module.visit(&mut v);
    v.out
}

struct AccumulatedVisitor<'a> {
    path: Vec<String>,
    out: Vec<NamedParam>,
    grads: &'a burn::optim::GradientsParams,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for AccumulatedVisitor<'_> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let grad = self.grads.get::<B::InnerBackend, D>(param.id).map(|g| g.into_data());
        impl_visit!(self, param, grad)
    }
}

/// Every float parameter of `module` with its path, value and its gradient in `grads` (e.g.
/// accumulated over micro-batches by the pipeline executor).
pub fn named_param_grads<B: AutodiffBackend, M: Module<B>>(module: &M, grads: &burn::optim::GradientsParams) -> Vec<NamedParam> {
    let mut v = AccumulatedVisitor { path: Vec::new(), out: Vec::new(), grads };
    module.visit(&mut v);
    v.out
}
