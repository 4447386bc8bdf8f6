"""TLS on the public port, bearer-token auth, mutual TLS between gateway and workers (own test CA)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import grpc
import pytest

from bloomduo.client import BloomduoError, Client
from bloomduo.core.checkpoint import Checkpoint
from tests.conftest import running_stack


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _issue(ca: Path, name: str, cwd: Path) -> None:
    """A certificate for `name` valid for localhost and 127.0.0.1, signed by the test CA."""
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
             "-subj", f"/CN={name}", cwd=cwd)  # fmt: skip
    (cwd / f"{name}.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=cwd)  # fmt: skip
    chain = (cwd / f"{name}.pem").read_bytes() + (cwd / "ca.pem").read_bytes()
    (cwd / f"{name}-chain.pem").write_bytes(chain)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
             "-days", "2", "-subj", "/CN=bloomduo test CA", cwd=root)  # fmt: skip
    for name in ("gateway", "shard", "gateway-client"):
        _issue(root / "ca.pem", name, root)
    (root / "token").write_text("s3cret-token\n")
    return root


def test_tls_token_and_mutual_tls(demo_model, pki: Path) -> None:
    gateway_args = (
        "--tls-cert", str(pki / "gateway-chain.pem"), "--tls-key", str(pki / "gateway.key"),
        "--auth-token-file", str(pki / "token"),
        "--shard-tls-ca", str(pki / "ca.pem"),
        "--shard-tls-cert", str(pki / "gateway-client.pem"),
        "--shard-tls-key", str(pki / "gateway-client.key"),
    )  # fmt: skip
    shard_args = (
        "--tls-cert", str(pki / "shard.pem"), "--tls-key", str(pki / "shard.key"),
        "--tls-ca", str(pki / "ca.pem"),
    )  # fmt: skip
    ca = (pki / "ca.pem").read_bytes()
    with running_stack(
        demo_model(), num_shards=2, gateway_args=gateway_args, shard_args=shard_args, tls_root=ca
    ) as stack:
        with Client(stack.target, root_certificates=ca, token="s3cret-token") as bloom:
            assert bloom.generate("over TLS", max_new_tokens=4, ignore_eos=True).generated_tokens == 4
        for token in (None, "wrong"):
            with Client(stack.target, root_certificates=ca, token=token, retries=0) as bloom:
                with pytest.raises(BloomduoError) as caught:
                    bloom.generate("no entry", max_new_tokens=2)
                assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
                assert "bearer token" in caught.value.message
                with pytest.raises(BloomduoError) as caught:
                    list(bloom.generate_stream("no entry", max_new_tokens=2))
                assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
        # Plain text to the TLS port fails; so does a worker reached without a client certificate.
        with Client(stack.target, token="s3cret-token", retries=0, timeout=5) as bloom:
            with pytest.raises(BloomduoError) as caught:
                bloom.info()
            assert caught.value.code == grpc.StatusCode.UNAVAILABLE
        from bloomduo.v1 import shard_pb2, shard_pb2_grpc

        credentials = grpc.ssl_channel_credentials(root_certificates=ca)
        with grpc.secure_channel(stack.shard_targets[0], credentials) as channel:
            with pytest.raises(grpc.RpcError) as refused:
                shard_pb2_grpc.ShardServiceStub(channel).Info(shard_pb2.ShardInfoRequest(), timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_bin_checkpoints_never_unpickle_code(tmp_path: Path) -> None:
    import pickle

    import torch

    class Exploit:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pwned",))

    (tmp_path / "config.json").write_text(
        '{"model_type": "bloom", "n_head": 2, "hidden_size": 4, "n_layer": 1}'
    )
    with open(tmp_path / "pytorch_model.bin", "wb") as handle:
        pickle.dump({"word_embeddings.weight": torch.zeros(2, 4), "evil": Exploit()}, handle)
    with pytest.raises(Exception):  # noqa: B017 - any refusal will do, as long as nothing ran
        Checkpoint(tmp_path).read("word_embeddings.weight")
    assert not (tmp_path / "pwned").exists()
