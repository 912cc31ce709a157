<#
.SYNOPSIS
    Registers the VMBusify tunnel port as a Hyper-V socket service on this Windows host.

.DESCRIPTION
    A Linux guest on Hyper-V (hv_sock) listens on a vsock port; Hyper-V carries it as a
    service GUID derived from the port: the port in hex as the first eight digits, then
    the fixed tail FACB-11E6-BD58-64006A7986D3. Hyper-V only lets a host reach that
    service once the GUID is registered under GuestCommunicationServices with a REG_SZ
    ElementName. Run once per host (as Administrator), for each port in use.

.PARAMETER Port
    The vsock port(s) the guest listens on. Default: 6541, VMBusify's tunnel port.

.PARAMETER Name
    The ElementName shown for the service.

.PARAMETER Remove
    Delete the registration instead of creating it.

.EXAMPLE
    .\hyperv-register.ps1
    .\hyperv-register.ps1 -Port 6541 -Name "VMBusify tunnel"
    .\hyperv-register.ps1 -Remove
#>
#Requires -RunAsAdministrator
[CmdletBinding(SupportsShouldProcess = $true)]
param(
    [ValidateRange(1, 4294967294)]
    [uint32[]] $Port = @(6541),
    [string] $Name = "VMBusify tunnel",
    [switch] $Remove
)

$ErrorActionPreference = "Stop"
$ServicesKey = "HKLM:\SOFTWARE\Microsoft\Windows NT\CurrentVersion\Virtualization\GuestCommunicationServices"

function Get-ServiceGuid([uint32] $VsockPort) {
    # The same mapping as vmbusify.transport.service_guid().
    return '{0:X8}-FACB-11E6-BD58-64006A7986D3' -f $VsockPort
}

if (-not (Test-Path $ServicesKey)) {
    throw "$ServicesKey does not exist: is the Hyper-V role installed on this machine?"
}

foreach ($p in $Port) {
    $guid = Get-ServiceGuid $p
    $key = Join-Path $ServicesKey $guid
    if ($Remove) {
        if (Test-Path $key) {
            if ($PSCmdlet.ShouldProcess($key, "Remove")) {
                Remove-Item -Path $key -Recurse
                Write-Host "removed port $p ($guid)"
            }
        } else {
            Write-Host "port $p ($guid) was not registered"
        }
        continue
    }
    if ($PSCmdlet.ShouldProcess($key, "Register as '$Name'")) {
        if (-not (Test-Path $key)) {
            New-Item -Path $ServicesKey -Name $guid | Out-Null
        }
        New-ItemProperty -Path $key -Name ElementName -Value $Name -PropertyType String -Force |
            Out-Null
        Write-Host "registered port $p as $guid ('$Name')"
    }
}
