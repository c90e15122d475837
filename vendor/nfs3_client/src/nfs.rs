use nfs3_types::nfs3::{
    ACCESS3args, ACCESS3res, COMMIT3args, COMMIT3res, CREATE3args, CREATE3res, FSINFO3args,
    FSINFO3res, FSSTAT3args, FSSTAT3res, GETATTR3args, GETATTR3res, LINK3args, LINK3res,
    LOOKUP3args, LOOKUP3res, MKDIR3args, MKDIR3res, MKNOD3args, MKNOD3res, NFS_PROGRAM,
    PATHCONF3args, PATHCONF3res, PROGRAM, READ3args, READ3res, READDIR3args, READDIR3res,
    READDIRPLUS3args, READDIRPLUS3res, READLINK3args, READLINK3res, REMOVE3args, REMOVE3res,
    RENAME3args, RENAME3res, RMDIR3args, RMDIR3res, SETATTR3args, SETATTR3res, SYMLINK3args,
    SYMLINK3res, VERSION, WRITE3args, WRITE3res, nfs_fh3, stable_how,
};
use nfs3_types::rpc::opaque_auth;
use nfs3_types::xdr_codec::{Pack, Unpack, Void};

use crate::RpcError;
use crate::io::{AsyncRead, AsyncWrite};
use crate::rpc::RpcClient;

/// Client for the `NFSv3` service
#[derive(Debug)]
pub struct Nfs3Client<IO> {
    rpc: RpcClient<IO>,
}

impl<IO> Nfs3Client<IO>
where
    IO: AsyncRead + AsyncWrite + Send,
{
    /// Create a new `NFSv3` client.
    pub fn new(io: IO) -> Self {
        Self {
            rpc: RpcClient::new(io),
        }
    }

    /// Create a new `NFSv3` client with custom credential and verifier.
    pub fn new_with_auth(
        io: IO,
        credential: opaque_auth<'static>,
        verifier: opaque_auth<'static>,
    ) -> Self {
        Self {
            rpc: RpcClient::new_with_auth(io, credential, verifier),
        }
    }

    pub async fn null(&mut self) -> Result<(), RpcError> {
        let _ = self
            .call::<Void, Void>(NFS_PROGRAM::NFSPROC3_NULL, &Void)
            .await?;
        Ok(())
    }

    pub async fn getattr(&mut self, args: &GETATTR3args) -> Result<GETATTR3res, RpcError> {
        self.call::<GETATTR3args, GETATTR3res>(NFS_PROGRAM::NFSPROC3_GETATTR, args)
            .await
    }

    pub async fn setattr(&mut self, args: &SETATTR3args) -> Result<SETATTR3res, RpcError> {
        self.call::<SETATTR3args, SETATTR3res>(NFS_PROGRAM::NFSPROC3_SETATTR, args)
            .await
    }

    pub async fn lookup(&mut self, args: &LOOKUP3args<'_>) -> Result<LOOKUP3res, RpcError> {
        self.call::<LOOKUP3args, LOOKUP3res>(NFS_PROGRAM::NFSPROC3_LOOKUP, args)
            .await
    }

    pub async fn access(&mut self, args: &ACCESS3args) -> Result<ACCESS3res, RpcError> {
        self.call::<ACCESS3args, ACCESS3res>(NFS_PROGRAM::NFSPROC3_ACCESS, args)
            .await
    }

    pub async fn readlink(
        &mut self,
        args: &READLINK3args,
    ) -> Result<READLINK3res<'static>, RpcError> {
        self.call::<READLINK3args, READLINK3res>(NFS_PROGRAM::NFSPROC3_READLINK, args)
            .await
    }

    pub async fn read(&mut self, args: &READ3args) -> Result<READ3res<'static>, RpcError> {
        self.call::<READ3args, READ3res>(NFS_PROGRAM::NFSPROC3_READ, args)
            .await
    }

    /// WRITE, its data sent from where it lies (not copied into the call).
    pub async fn write(&mut self, args: &WRITE3args<'_>) -> Result<WRITE3res, RpcError> {
        let head = WriteHead {
            file: &args.file,
            offset: args.offset,
            count: args.count,
            stable: args.stable,
        };
        self.rpc
            .call_with_payload::<WriteHead, WRITE3res>(
                PROGRAM,
                VERSION,
                NFS_PROGRAM::NFSPROC3_WRITE as u32,
                &head,
                &args.data,
            )
            .await
    }

    pub async fn create(&mut self, args: &CREATE3args<'_>) -> Result<CREATE3res, RpcError> {
        self.call::<CREATE3args, CREATE3res>(NFS_PROGRAM::NFSPROC3_CREATE, args)
            .await
    }

    pub async fn mkdir(&mut self, args: &MKDIR3args<'_>) -> Result<MKDIR3res, RpcError> {
        self.call::<MKDIR3args, MKDIR3res>(NFS_PROGRAM::NFSPROC3_MKDIR, args)
            .await
    }

    pub async fn symlink(&mut self, args: &SYMLINK3args<'_>) -> Result<SYMLINK3res, RpcError> {
        self.call::<SYMLINK3args, SYMLINK3res>(NFS_PROGRAM::NFSPROC3_SYMLINK, args)
            .await
    }

    pub async fn mknod(&mut self, args: &MKNOD3args<'_>) -> Result<MKNOD3res, RpcError> {
        self.call::<MKNOD3args, MKNOD3res>(NFS_PROGRAM::NFSPROC3_MKNOD, args)
            .await
    }

    pub async fn remove(&mut self, args: &REMOVE3args<'_>) -> Result<REMOVE3res, RpcError> {
        self.call::<REMOVE3args, REMOVE3res>(NFS_PROGRAM::NFSPROC3_REMOVE, args)
            .await
    }

    pub async fn rmdir(&mut self, args: &RMDIR3args<'_>) -> Result<RMDIR3res, RpcError> {
        self.call::<RMDIR3args, RMDIR3res>(NFS_PROGRAM::NFSPROC3_RMDIR, args)
            .await
    }

    pub async fn rename(&mut self, args: &RENAME3args<'_, '_>) -> Result<RENAME3res, RpcError> {
        self.call::<RENAME3args, RENAME3res>(NFS_PROGRAM::NFSPROC3_RENAME, args)
            .await
    }

    pub async fn link(&mut self, args: &LINK3args<'_>) -> Result<LINK3res, RpcError> {
        self.call::<LINK3args, LINK3res>(NFS_PROGRAM::NFSPROC3_LINK, args)
            .await
    }

    pub async fn readdir(&mut self, args: &READDIR3args) -> Result<READDIR3res<'static>, RpcError> {
        self.call::<READDIR3args, READDIR3res>(NFS_PROGRAM::NFSPROC3_READDIR, args)
            .await
    }

    pub async fn readdirplus(
        &mut self,
        args: &READDIRPLUS3args,
    ) -> Result<READDIRPLUS3res<'static>, RpcError> {
        self.call::<READDIRPLUS3args, READDIRPLUS3res>(NFS_PROGRAM::NFSPROC3_READDIRPLUS, args)
            .await
    }

    pub async fn fsstat(&mut self, args: &FSSTAT3args) -> Result<FSSTAT3res, RpcError> {
        self.call::<FSSTAT3args, FSSTAT3res>(NFS_PROGRAM::NFSPROC3_FSSTAT, args)
            .await
    }

    pub async fn fsinfo(&mut self, args: &FSINFO3args) -> Result<FSINFO3res, RpcError> {
        self.call::<FSINFO3args, FSINFO3res>(NFS_PROGRAM::NFSPROC3_FSINFO, args)
            .await
    }

    pub async fn pathconf(&mut self, args: &PATHCONF3args) -> Result<PATHCONF3res, RpcError> {
        self.call::<PATHCONF3args, PATHCONF3res>(NFS_PROGRAM::NFSPROC3_PATHCONF, args)
            .await
    }

    pub async fn commit(&mut self, args: &COMMIT3args) -> Result<COMMIT3res, RpcError> {
        self.call::<COMMIT3args, COMMIT3res>(NFS_PROGRAM::NFSPROC3_COMMIT, args)
            .await
    }

    async fn call<C, R>(&mut self, proc: NFS_PROGRAM, args: &C) -> Result<R, RpcError>
    where
        R: Unpack,
        C: Pack + Send + Sync,
    {
        self.rpc
            .call::<C, R>(PROGRAM, VERSION, proc as u32, args)
            .await
    }
}

/// `WRITE3args` up to its data: what [`Nfs3Client::write`] packs into the
/// call before the data, which goes out from where it lies.
struct WriteHead<'a> {
    file: &'a nfs_fh3,
    offset: u64,
    count: u32,
    stable: stable_how,
}

impl Pack for WriteHead<'_> {
    fn packed_size(&self) -> usize {
        self.file.packed_size()
            + self.offset.packed_size()
            + self.count.packed_size()
            + self.stable.packed_size()
    }

    fn pack(&self, out: &mut impl std::io::Write) -> Result<usize, nfs3_types::xdr_codec::Error> {
        Ok(self.file.pack(out)?
            + self.offset.pack(out)?
            + self.count.pack(out)?
            + self.stable.pack(out)?)
    }
}
